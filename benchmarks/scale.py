"""Scale: time and peak memory of one hypergradient as the hyperparameters grow to 10^7 and beyond.

One weight decay per weight of the digits MLP, widened until it has N weights, so N
hyperparameters. For each N, a fresh subprocess compiles `ih.hypergrad_with_info` with
`Neumann(steps=K, alpha=1/lambda_max)` (the estimate computed once beforehand) and one
gradient of the training loss for comparison, times both (median after a warm-up),
and reports XLA's memory analysis of the hypergradient and the process's peak memory
(peak RSS on CPU; the device's peak bytes in use on a GPU).

  python benchmarks/scale.py                    # N = 10^3 .. 10^7 (CPU: about 3 minutes)
  python benchmarks/scale.py --max-size 1e8     # on a GPU with enough memory
"""

import functools
import json
import math
import time

import jax

import implicit_hyper as ih

try:
  import _common
except ImportError:  # imported as benchmarks.scale
  from benchmarks import _common


def hypergradient(params, log_decay, train, val, alpha, *, steps: int):
  solver = ih.Neumann(steps=steps, alpha=alpha)
  return _common.library_hypergrad(params, log_decay, train, val, solver=solver)


def inverse_largest_eigenvalue(params, log_decay, train, val):
  del val
  matvec = ih.hessian_vector_product(_common.inner_loss, params, log_decay, train)
  return 1.0 / ih.max_eigenvalue(matvec, params)


def timed(fn, *args, max_runs: int, budget_s: float) -> list:
  """Seconds per call after one warm-up: `max_runs` calls, or fewer (>= 3) within `budget_s`."""
  _common.block(fn(*args))
  samples = []
  while len(samples) < max_runs and (len(samples) < 3 or sum(samples) < budget_s):
    start = time.perf_counter()
    _common.block(fn(*args))
    samples.append(time.perf_counter() - start)
  return samples


def measure(*, hidden: int, steps: int, batch_size: int, max_runs: int, budget_s: float) -> dict:
  """Compiles, times and measures one size in this process."""
  problem = _common.make_problem(hidden, batch_size=batch_size)
  before = _common.peak_memory_bytes()
  alpha = jax.jit(inverse_largest_eigenvalue)(*problem)
  compiled = jax.jit(functools.partial(hypergradient, steps=steps)).lower(*problem, alpha).compile()
  analysis = compiled.memory_analysis()
  hyper_samples = timed(compiled, *problem, alpha, max_runs=max_runs, budget_s=budget_s)
  _, info, _ = compiled(*problem, alpha)
  gradient = jax.jit(jax.grad(_common.inner_loss))
  grad_samples = timed(
    gradient,
    problem.params,
    problem.log_decay,
    *problem.train,
    max_runs=max_runs,
    budget_s=budget_s,
  )
  return {
    "hidden": hidden,
    "hyperparameters": _common.num_weights(hidden),
    "seconds": _common.median(hyper_samples),
    "gradient_seconds": _common.median(grad_samples),
    "runs": len(hyper_samples),
    "xla_temp_bytes": int(analysis.temp_size_in_bytes),
    "xla_total_bytes": int(
      analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
    ),
    "peak_before_bytes": before,
    "peak_bytes": _common.peak_memory_bytes(),
    "residual_norm": float(info.residual_norm),
    "diverged": bool(info.diverged),
  }


def sizes_up_to(max_size: float, *, smallest: float = 1e3) -> list:
  """Powers of ten from `smallest` to `max_size`."""
  return [10**e for e in range(round(math.log10(smallest)), round(math.log10(max_size)) + 1)]


def main(argv=None):
  parser = _common.common_args(__doc__.splitlines()[0])
  parser.add_argument(
    "--max-size", type=float, default=1e7, help="largest number of hyperparameters"
  )
  parser.add_argument("--steps", type=int, default=20, help="K, products per hypergradient")
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--max-runs", type=int, default=10, help="timed calls per size at most")
  parser.add_argument("--budget", type=float, default=30.0, help="seconds of timed calls per size")
  args = parser.parse_args(argv)
  config = {
    "steps": 3 if args.quick else args.steps,
    "batch_size": args.batch_size,
    "max_runs": 2 if args.quick else args.max_runs,
    "budget_s": args.budget,
  }
  if args.child:
    print(json.dumps(measure(**config, **json.loads(args.child))))
    return

  results = []
  for size in [300, 1000] if args.quick else sizes_up_to(args.max_size):
    hidden = _common.hidden_for(size)
    print(f"{_common.num_weights(hidden):,} hyperparameters...", flush=True)
    results.append(_common.run_in_subprocess(__file__, {"hidden": hidden}))
  print(f"\none hypergradient (Neumann, K = {config['steps']}) per number of hyperparameters:")
  _common.print_table(
    [
      "hyperparameters",
      "hypergradient",
      "one gradient",
      "hypergradient / gradient",
      "XLA total",
      "peak memory",
      "peak - before compile",
    ],
    [
      [
        f"{r['hyperparameters']:,}",
        _common.format_seconds(r["seconds"]),
        _common.format_seconds(r["gradient_seconds"]),
        f"{r['seconds'] / r['gradient_seconds']:.1f}",
        _common.format_bytes(r["xla_total_bytes"]),
        _common.format_bytes(r["peak_bytes"]),
        _common.format_bytes(_common.difference(r["peak_bytes"], r["peak_before_bytes"])),
      ]
      for r in results
    ],
  )
  _common.write_json(
    args.out, "scale", {"machine": _common.machine(), **config, "results": results}
  )
  plot(results, args.out / "scale.png")


def plot(results, path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n = [r["hyperparameters"] for r in results]
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  left.loglog(n, [r["seconds"] for r in results], marker="o", label="hypergradient (Neumann)")
  left.loglog(n, [r["gradient_seconds"] for r in results], marker="o", label="one gradient")
  left.set(xlabel="hyperparameters (= weights)", ylabel="seconds")
  right.loglog(
    n, [r["xla_total_bytes"] for r in results], marker="o", label="XLA: args + out + temp"
  )
  right.loglog(
    n, [r["peak_bytes"] for r in results], marker="o", label="peak memory of the process"
  )
  right.set(xlabel="hyperparameters (= weights)", ylabel="bytes")
  for ax in (left, right):
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
