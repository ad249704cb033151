"""Memory: one hypergradient after T training steps, implicit versus unrolled.

Both methods start from the same weights and run T steps of gradient descent on the
training loss of the per-weight-decay MLP, then take the hypergradient of the
validation loss:

  implicit   the T steps in a `fori_loop` (nothing kept for reverse mode), then
             `ih.hypergrad_with_info` with `Neumann(steps=20, alpha=lr)` at the final weights
  unrolled   `jax.grad` through the T steps (a `scan`: reverse mode keeps every step)

For each method and T, a fresh subprocess compiles the function once, reads XLA's
memory analysis of the compiled program (arguments + outputs + temporaries) and runs
it, and reports its peak resident memory (on a GPU, the device's peak bytes in use)
before compiling and after the run. The implicit method's memory must not grow with T.

  python benchmarks/memory.py                    # T in 10, 100, 1000; width 256
  python benchmarks/memory.py --steps 10 100 1000 10000
"""

import json

import jax

import implicit_hyper as ih

try:
  import _common
except ImportError:  # imported as benchmarks.memory
  from benchmarks import _common

METHODS = ("implicit", "unrolled")
NEUMANN_STEPS = 20


def hypergradient_after_training(method: str, *, steps: int, lr: float):
  """The function ``(params, log_decay, train, val) -> hypergradient`` for `method`."""
  if method == "unrolled":

    def unrolled(params, log_decay, train, val):
      return _common.unrolled_hypergrad(params, log_decay, train, val, steps=steps, lr=lr)

    return unrolled

  def implicit(params, log_decay, train, val):
    trained = _common.sgd_steps(params, log_decay, train, steps=steps, lr=lr, scan=False)
    solver = ih.Neumann(steps=NEUMANN_STEPS, alpha=lr)
    return _common.library_hypergrad(trained, log_decay, train, val, solver=solver)[0]

  return implicit


def measure(method: str, *, steps: int, hidden: int, batch_size: int, lr: float) -> dict:
  """Compiles and runs one configuration in this process; returns its memory figures."""
  problem = _common.make_problem(hidden, batch_size=batch_size)
  before = _common.peak_memory_bytes()
  fn = hypergradient_after_training(method, steps=steps, lr=lr)
  compiled = jax.jit(fn).lower(*problem).compile()
  analysis = compiled.memory_analysis()
  grads = _common.block(compiled(*problem))
  return {
    "method": method,
    "steps": steps,
    "xla_temp_bytes": int(analysis.temp_size_in_bytes),
    "xla_total_bytes": int(
      analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
    ),
    "peak_before_bytes": before,
    "peak_bytes": _common.peak_memory_bytes(),
    "finite": _common.all_finite(grads),
  }


def main(argv=None):
  parser = _common.common_args(__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000], help="T values")
  parser.add_argument("--width", type=int, default=256, help="hidden width of the MLP")
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--lr", type=float, default=0.05, help="gradient-descent step (and alpha)")
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(measure(**json.loads(args.child))))
    return
  steps_list = [2, 4] if args.quick else args.steps
  hidden = 8 if args.quick else args.width
  config = {"hidden": hidden, "batch_size": args.batch_size, "lr": args.lr}

  results = []
  for steps in steps_list:
    for method in METHODS:
      print(f"{method}, T = {steps}...", flush=True)
      results.append(
        _common.run_in_subprocess(__file__, {"method": method, "steps": steps, **config})
      )
  fmt = _common.format_bytes
  print(f"\none hypergradient after T steps, MLP with {_common.num_weights(hidden):,} weights:")
  _common.print_table(
    ["method", "T", "XLA temp", "XLA total", "peak RSS", "peak - before compile", "finite"],
    [
      [
        r["method"],
        r["steps"],
        fmt(r["xla_temp_bytes"]),
        fmt(r["xla_total_bytes"]),
        fmt(r["peak_bytes"]),
        fmt(_common.difference(r["peak_bytes"], r["peak_before_bytes"])),
        r["finite"],
      ]
      for r in results
    ],
  )
  payload = {
    "machine": _common.machine(),
    "weights": _common.num_weights(hidden),
    "neumann_steps": NEUMANN_STEPS,
    **config,
    "results": results,
  }
  _common.write_json(args.out, "memory", payload)


if __name__ == "__main__":
  main()
