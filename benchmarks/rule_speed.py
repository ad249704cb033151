"""Rule speed: reverse mode through `ih.implicit_argmin` against the hand-written floor.

The decorators are one `jax.custom_jvp` whose reverse mode is JAX's transposition of a
`lax.custom_linear_solve`. This times, in interleaved rounds, the gradient of the
validation loss through a decorated inner solver (its output taken as the optimum) with
`Neumann(steps=K, alpha=1/lambda_max)` against the hand-written floor of `speed.py` and
`ih.hypergrad` with the same solver, and prints the medians and the median ratio to the
floor over rounds.

  python benchmarks/rule_speed.py            # widths 128, 1024, 8192
"""

import functools
import statistics

import jax

import implicit_hyper as ih

try:
  import _common
  import speed
except ImportError:  # imported as benchmarks.rule_speed
  from benchmarks import _common
  from benchmarks import speed


def decorated_hypergrad(params, log_decay, train, val, *, solver):
  """jax.grad of L_V through `implicit_argmin`; no checks (the weights are at their
  initialisation, where the Hessian is indefinite: the other columns do not check either)."""

  @ih.implicit_argmin(_common.inner_loss, solver=solver, stationarity_tol=None, on_failure="ignore")
  def trained(init_params, log_decay, x, y):
    del log_decay, x, y
    return init_params

  return jax.grad(lambda ld: _common.outer_loss(trained(params, ld, *train), ld, *val))(log_decay)


def _median_ratio(samples, name):
  return statistics.median(a / b for a, b in zip(samples[name], samples["floor"], strict=True))


def main(argv=None):
  parser = _common.common_args(__doc__.splitlines()[0])
  parser.add_argument("--widths", type=int, nargs="+", default=[128, 1024, 8192])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=15)
  args = parser.parse_args(argv)
  widths, rounds = ([16], 2) if args.quick else (args.widths, args.rounds)
  rows = []
  for hidden in widths:
    p = _common.make_problem(hidden)
    inputs = (p.params, p.log_decay, p.train, p.val)
    hessian = ih.hessian_vector_product(_common.inner_loss, p.params, p.log_decay, p.train)
    alpha = float(1.0 / ih.max_eigenvalue(hessian, p.params))
    solver = ih.Neumann(steps=args.steps, alpha=alpha)
    calls = {
      "floor": jax.jit(functools.partial(speed.handwritten_neumann, steps=args.steps, alpha=alpha)),
      "implicit_argmin": jax.jit(functools.partial(decorated_hypergrad, solver=solver)),
      "hypergrad": jax.jit(
        lambda *a: _common.library_hypergrad(*a, solver=solver)[0]  # noqa: B023
      ),
    }
    samples, outputs = _common.time_interleaved(
      {k: functools.partial(f, *inputs) for k, f in calls.items()}, rounds=rounds
    )
    ratio = functools.partial(_median_ratio, samples)
    cos = _common.cosine(outputs["implicit_argmin"], outputs["floor"])
    rows.append(
      [
        f"{_common.num_weights(hidden):,}",
        *(_common.format_seconds(_common.median(samples[k])) for k in calls),
        f"{ratio('implicit_argmin'):.3f}x",
        f"{ratio('hypergrad'):.3f}x",
        f"{cos:.6f}",
      ]
    )
  _common.print_table(
    ["weights", *calls, "argmin / floor", "hypergrad / floor", "cosine to floor"], rows
  )


if __name__ == "__main__":
  main()
