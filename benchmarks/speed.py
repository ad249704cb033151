"""Speed: one hypergradient of an MLP with one weight decay per weight, by every method.

For each hidden width, times the hypergradient of the validation loss with K products:
each round calls every method once, after a warm-up; times are medians over rounds, and
ratios the median over rounds of the ratio within a round:

  ih Neumann(alpha)   `ih.hypergrad_with_info` with `Neumann(steps=K, alpha=1/lambda_max)`, the
                      estimate computed once beforehand, as a training loop caches it
  ih Neumann(auto)    `Neumann(steps=K, alpha=None)`: 21 more products for the estimate
  ih CG               `CG(steps=K, tol=0, ridge=RIDGE)`
  ih MINRES           `MINRES(steps=K, tol=0, ridge=RIDGE)`: one more product, the residual
  ih Nystrom          `Nystrom(rank=K, ridge=RIDGE)`: a fresh sketch of K products and
                      one more for the residual
  floor               one jitted function written here by hand: grad of L_V, K
                      forward-over-reverse products in a `fori_loop`, one mixed VJP
  jaxopt CG           `jaxopt.implicit_diff.custom_root` with
                      `solve_cg(maxiter=K, tol=0, ridge=RIDGE)`
  jaxopt normal CG    the same with jaxopt's default solver, `solve_normal_cg(maxiter=K, tol=0)`
  unrolled            reverse mode through K gradient-descent steps of size alpha
  one gradient        `jax.grad` of the training loss, for scale

Every iterative solver runs exactly K iterations (tol=0). The weights are at their
random initialisation, where the Hessian has negative eigenvalues (about -0.66 at width
128): `ih.CG` stops there at the first non-positive curvature, so both CG columns solve
with ``H + RIDGE I``, as iMAML's proximal term does, and run all K steps.

Also reports XLA's flop count and the time of one Hessian-vector product each way:
forward-over-reverse (this library and the floor), and reverse-over-reverse on the
gradient linearised once (jaxopt's `custom_root` applies `jax.vjp` of the optimality
condition), next to one gradient.

  python benchmarks/speed.py            # widths 128, 1024, 8192: 9,472 to 606,208 weights
  python benchmarks/speed.py --large    # adds width 65536: 4,849,664 weights
"""

import functools
import warnings

import jax
import optax.tree_utils as otu

import implicit_hyper as ih

try:
  import _common
except ImportError:  # imported as benchmarks.speed
  from benchmarks import _common

FLOOR = "floor"
JAXOPT_CG = "jaxopt CG"
RIDGE = 1.0


def handwritten_neumann(params, log_decay, train, val, *, steps: int, alpha: float):
  """The floor: ``-(d^2 L_T / d lambda d w)^T alpha sum_j (I - alpha H)^j dL_V/dw``.

  L_V does not depend on the decays, so its direct term is zero and left out.
  """
  grad_inner = jax.grad(_common.inner_loss)
  v = jax.grad(_common.outer_loss)(params, log_decay, *val)

  def term(_, carry):
    x, p = carry
    hp = jax.jvp(lambda w: grad_inner(w, log_decay, *train), (params,), (p,))[1]
    return otu.tree_add_scale(x, alpha, p), otu.tree_add_scale(p, -alpha, hp)

  x, _ = jax.lax.fori_loop(0, steps, term, (otu.tree_zeros_like(v), v))
  _, mixed_vjp = jax.vjp(lambda ld: grad_inner(params, ld, *train), log_decay)
  return otu.tree_scale(-1.0, mixed_vjp(x)[0])


def jaxopt_hypergrad(params, log_decay, train, val, *, solve):
  """jaxopt's documented use: `custom_root` on the gradient of the training loss."""
  from jaxopt import implicit_diff

  optimality = lambda w, ld: jax.grad(_common.inner_loss)(w, ld, *train)

  @implicit_diff.custom_root(optimality, solve=solve)
  def trained_weights(init_params, log_decay):
    del log_decay
    return init_params  # `params` are taken as the optimum, as by the other methods.

  validation = lambda ld: _common.outer_loss(trained_weights(params, ld), ld, *val)
  return jax.grad(validation)(log_decay)


def jaxopt_linear_solve():
  """`jaxopt.linear_solve`, or None when jaxopt (the optional `bench` extra) is missing."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # jaxopt is archived.
    try:
      from jaxopt import implicit_diff  # noqa: F401
      from jaxopt import linear_solve
    except ImportError:
      return None
  return linear_solve


def methods(steps: int, alpha: float) -> dict:
  """Every method as a function of ``(params, log_decay, train, val)``."""
  library = lambda solver: functools.partial(_common.library_hypergrad, solver=solver)
  fns = {
    FLOOR: functools.partial(handwritten_neumann, steps=steps, alpha=alpha),
    "ih Neumann(alpha)": library(solver=ih.Neumann(steps=steps, alpha=alpha)),
    "ih Neumann(auto)": library(solver=ih.Neumann(steps=steps)),
    "ih CG": library(solver=ih.CG(steps=steps, tol=0.0, ridge=RIDGE)),
    "ih MINRES": library(solver=ih.MINRES(steps=steps, tol=0.0, ridge=RIDGE)),
    "ih Nystrom": library(solver=ih.Nystrom(rank=steps, ridge=RIDGE)),
  }
  linear_solve = jaxopt_linear_solve()
  if linear_solve is None:
    print("jaxopt is not installed (pip install -e '.[bench]'): skipping its columns.")
  else:
    cg = functools.partial(linear_solve.solve_cg, maxiter=steps, tol=0.0, ridge=RIDGE)
    normal_cg = functools.partial(linear_solve.solve_normal_cg, maxiter=steps, tol=0.0)
    fns[JAXOPT_CG] = functools.partial(jaxopt_hypergrad, solve=cg)
    fns["jaxopt normal CG"] = functools.partial(jaxopt_hypergrad, solve=normal_cg)
  fns[f"unrolled {steps} steps"] = functools.partial(
    _common.unrolled_hypergrad, steps=steps, lr=alpha
  )
  fns["one gradient"] = lambda w, ld, train, val: jax.grad(_common.inner_loss)(w, ld, *train)
  return fns


def step_size(problem) -> float:
  """``1 / lambda_max`` of the training-loss Hessian, by power iteration."""

  def estimate(params, log_decay, train):
    matvec = ih.hessian_vector_product(_common.inner_loss, params, log_decay, train)
    return 1.0 / ih.max_eigenvalue(matvec, params)

  return float(jax.jit(estimate)(problem.params, problem.log_decay, problem.train))


PRODUCT_KINDS = ("gradient", "forward-over-reverse", "reverse-over-reverse")


def repeated_products(kind: str, count: int, alpha: float, *, unroll: bool = False):
  """`count` steps ``v <- v - alpha P(v)`` in a `fori_loop`, P chosen by `kind`.

  "gradient": P is the gradient of the training loss at v (gradient descent).
  "forward-over-reverse": ``P(v) = H v`` by `jax.jvp` of the gradient, as in this library.
  "reverse-over-reverse": ``P(v) = H v`` by the VJP of the gradient, linearised once
  before the loop, as jaxopt's `custom_root` applies `jax.vjp` to the optimality condition.
  """

  def run(params, log_decay, train):
    grad = lambda w: jax.grad(_common.inner_loss)(w, log_decay, *train)
    if kind == "gradient":
      product = grad
    elif kind == "forward-over-reverse":
      product = lambda v: jax.jvp(grad, (params,), (v,))[1]
    else:
      vjp = jax.vjp(grad, params)[1]
      product = lambda v: vjp(v)[0]
    step = lambda _, v: otu.tree_add_scale(v, -alpha, product(v))
    return jax.lax.fori_loop(0, count, step, params, unroll=unroll)

  return run


def product_costs(problem, *, alpha: float, rounds: int, count: int = 10) -> dict:
  """XLA's flop count and the seconds of one gradient and one product each way.

  The time is that of a loop of `count` of them, divided by `count`; the flops are the
  difference between fully unrolled loops of 3 and of 2.
  """
  args = (problem.params, problem.log_decay, problem.train)
  flops = lambda fn: jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]
  costs, calls = {}, {}
  for kind in PRODUCT_KINDS:
    unrolled = lambda n, kind=kind: repeated_products(kind, n, alpha, unroll=True)
    costs[kind] = {"flops": flops(unrolled(3)) - flops(unrolled(2))}
    calls[kind] = functools.partial(jax.jit(repeated_products(kind, count, alpha)), *args)
  samples, _ = _common.time_interleaved(calls, rounds=rounds)
  for kind, cost in costs.items():
    cost["seconds"] = _common.median(samples[kind]) / count
  return costs


def benchmark_width(
  hidden: int, *, steps: int, rounds: int, budget_s: float, batch_size: int, only
) -> dict:
  problem = _common.make_problem(hidden, batch_size=batch_size)
  alpha = step_size(problem)
  fns = {name: fn for name, fn in methods(steps, alpha).items() if not only or name in only}
  calls = {name: functools.partial(jax.jit(fn), *problem) for name, fn in fns.items()}
  samples, outputs = _common.time_interleaved(
    calls, rounds=rounds, budget_s=budget_s, max_rounds=10 * rounds
  )
  result = {
    "hidden": hidden,
    "weights": _common.num_weights(hidden),
    "alpha": alpha,
    "seconds": {name: _common.median(s) for name, s in samples.items()},
    "samples": samples,
    "library_solver_steps": {
      name: int(out[1].num_steps) for name, out in outputs.items() if name.startswith("ih ")
    },
    "product_costs": product_costs(problem, alpha=alpha, rounds=rounds),
  }
  if "ih Neumann(alpha)" in outputs and FLOOR in outputs:
    result["cosine_neumann_to_floor"] = _common.cosine(
      outputs["ih Neumann(alpha)"][0], outputs[FLOOR]
    )
  for name, ran in result["library_solver_steps"].items():
    if ran != steps:
      print(f"  note: {name} stopped after {ran} of {steps} steps (non-positive curvature)")
  return result


def _ratios(results, names, reference):
  """Median over rounds of each method's time over `reference`'s time in the same round.

  Calls in one round are seconds apart, so this ratio is robust to the load of other
  processes drifting during the run, which the ratio of two medians is not.
  """
  for r in results:
    if reference in r["samples"]:
      ref = r["samples"][reference]
      r[f"ratio_to_{reference}"] = {
        n: _common.median([t / t_ref for t, t_ref in zip(r["samples"][n], ref, strict=True)])
        for n in names
      }


def main(argv=None):
  parser = _common.common_args(__doc__.splitlines()[0])
  parser.add_argument("--widths", type=int, nargs="+", default=[128, 1024, 8192])
  parser.add_argument("--large", action="store_true", help="also width 65536 (4.8M weights)")
  parser.add_argument("--steps", type=int, default=20, help="K, products per hypergradient")
  parser.add_argument("--rounds", type=int, default=20, help="timed calls per method, at least")
  parser.add_argument(
    "--budget", type=float, default=30.0, help="seconds per width for more rounds (up to 10x)"
  )
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--only", nargs="+", help="time only these methods (names as printed)")
  args = parser.parse_args(argv)
  widths = [16] if args.quick else args.widths + ([65536] if args.large else [])
  rounds = 2 if args.quick else args.rounds
  steps = 3 if args.quick else args.steps

  results = []
  for hidden in widths:
    print(f"width {hidden} ({_common.num_weights(hidden):,} weights)...", flush=True)
    results.append(
      benchmark_width(
        hidden,
        steps=steps,
        rounds=rounds,
        budget_s=0.0 if args.quick else args.budget,
        batch_size=args.batch_size,
        only=args.only,
      )
    )
  names = list(results[0]["seconds"])
  _ratios(results, names, FLOOR)
  _ratios(results, names, JAXOPT_CG)
  row = lambda r, cells: [f"{r['weights']:,}", *cells]
  counts = ", ".join(str(len(r["samples"][names[0]])) for r in results)
  print(f"\nmedian time per hypergradient, K = {steps}, rounds per width: {counts}")
  _common.print_table(
    ["weights", *names],
    [row(r, [_common.format_seconds(r["seconds"][n]) for n in names]) for r in results],
  )
  for reference in (FLOOR, JAXOPT_CG):
    key = f"ratio_to_{reference}"
    if all(key in r for r in results):
      print(f"\nratio to {reference} (median of per-round ratios):")
      _common.print_table(
        ["weights", *names], [row(r, [f"{r[key][n]:.2f}" for n in names]) for r in results]
      )
  print("\none gradient and one Hessian-vector product: XLA's flop count, median time:")
  kinds = list(results[0]["product_costs"])
  cost = lambda c: f"{c['flops']:.3g} flops, {_common.format_seconds(c['seconds'])}"
  _common.print_table(
    ["weights", *kinds], [row(r, [cost(r["product_costs"][k]) for k in kinds]) for r in results]
  )
  payload = {
    "machine": _common.machine(),
    "steps": steps,
    "min_rounds": rounds,
    "batch_size": args.batch_size,
    "ridge_for_cg": RIDGE,
    "results": results,
  }
  _common.write_json(args.out, "speed", payload)


if __name__ == "__main__":
  main()
