"""The numbers of the concepts pages, the guides and the solver-choice page, rendered.

Each function returns one `<!-- NAME:begin -->` block; every number is read from
`docs/results/<run>/` (see tools/render_results.py).
"""

from tools._results import error
from tools._results import load
from tools._results import ratio_range
from tools._results import sci
from tools._results import seconds
from tools._results import stdout_table
from tools._results import wall

NEUMANN = "Neumann(alpha=1/lambda_max)"


def _speed() -> list[dict]:
  return load("speed", "speed.json")["results"]


def _widths(results: list[dict]) -> str:
  return f"{results[0]['weights']:,}–{results[-1]['weights']:,} weights"


def _accuracy() -> dict:
  return {r["problem"]: r for r in load("accuracy", "accuracy.json")["results"]}


def _error_at(problem: dict, method: str, k: int) -> str:
  curve = problem["curves"][method]
  return sci(curve["relative_error"][curve["k"].index(k)])


def _evaluations(reached: dict) -> str:
  return "never" if reached.get("seconds") is None else f"{reached['evaluations']:,.0f}"


def unrolled_memory() -> str:
  memory = load("memory", "memory.json")
  by = {(r["method"], r["steps"]): r["xla_total_bytes"] for r in memory["results"]}
  from tools._results import mebibytes

  rows = [
    f"| {steps} | {mebibytes(by['implicit', steps])} | {mebibytes(by['unrolled', steps])} |"
    for steps in sorted({s for _, s in by})
  ]
  return (
    "The project's memory benchmark (`benchmarks/memory.py`, published in"
    f" `docs/results/memory/memory.json`; {memory['weights']:,}-weight MLP, Neumann with"
    f" K = {memory['neumann_steps']}) measures the compiled program's memory from XLA's analysis:"
    "\n\n| T training steps | implicit | unrolled |\n|---|---|---|\n" + "\n".join(rows)
  )


def unrolled_speed() -> str:
  results = _speed()
  pairs = " and ".join(
    f"{seconds(r['seconds']['ih Neumann(alpha)'])} vs {seconds(r['seconds']['unrolled 20 steps'])}"
    f" at {r['weights']:,} weights"
    for r in (results[0], results[-1])
  )
  return (
    "The speed benchmark (`benchmarks/speed.py`, `docs/results/speed/speed.json`) times one"
    " hypergradient with 20 products against 20 unrolled gradient-descent steps:"
    f" {pairs} ({load('speed', 'run.json')['machine']['cores']} CPU cores)."
  )


def rule_speed() -> str:
  rows = stdout_table("rule_speed")
  ratios = [float(row[4].rstrip("x")) for row in rows]
  cosines = sorted({row[6] for row in rows})
  return (
    "The published run of `python benchmarks/rule_speed.py`"
    f" (`docs/results/rule_speed/stdout.txt`, {wall('rule_speed')}) has a decorated solver's"
    f" reverse-mode hypergradient at {ratio_range(ratios, 3)}× the floor's time at"
    f" {rows[0][0]}–{rows[-1][0]} weights, cosine {' / '.join(cosines)} to it."
  )


def solver_table() -> str:
  speed, acc = _speed(), _accuracy()
  ratio = lambda key: ratio_range([r["ratio_to_floor"][key] for r in speed])  # noqa: E731
  costs = [r["product_costs"] for r in speed]
  slower = [
    c["reverse-over-reverse"]["seconds"] / c["forward-over-reverse"]["seconds"] for c in costs
  ]
  ridge, logistic = acc["ridge"], acc["logistic"]
  e2e = load("end_to_end", "end_to_end.json")
  e2e_results = e2e["results"]
  reference = next(iter(e2e_results.values()))["products_to_target"]
  vs = lambda name: e2e_results[name]["products_to_target"] / reference  # noqa: E731
  inv = load("inverse_comparison")
  imaml = load("imaml_sinusoid")
  direct = lambda p: seconds(p["curves"]["Direct"]["seconds"][-1])  # noqa: E731
  nystrom_20 = _error_at(ridge, "CG+Nystrom", 20)
  nystrom_cg = "CG 10 + Nystrom prec. (rank 10, every 10)"
  nystrom_online = (
    "it never reached Neumann's validation loss"
    if e2e_results[nystrom_cg]["products_to_target"] is None
    else f"it reached Neumann's validation loss with {vs(nystrom_cg):.2f}× its products"
  )
  widths = _widths(speed)
  rows = [
    (
      "the online loop on a network (`ih.bilevel`), a fixed budget of K products, H possibly"
      " indefinite",
      "`ih.Neumann(steps=K)` (the default), its step 1/λ_max estimated and cached in the loop's"
      " solver state",
      f"{ratio('ih Neumann(alpha)')}× the time of a hand-written forward-over-reverse Neumann"
      f" hypergradient at {widths}; the same hypergradient (cosine"
      f" {ratio_range([r['cosine_neumann_to_floor'] for r in speed], 6)})",
      "`docs/results/speed/speed.json`: `ratio_to_floor`, `cosine_neumann_to_floor`",
    ),
    (
      "one hypergradient at a time with `ih.Neumann(alpha=None)` and no carried state",
      "fix `alpha=` or carry the state (`ih.hypergrad_with_info(..., solver_state=)`)",
      "`alpha=None` re-estimates λ_max at every call (a Lanczos estimate):"
      f" {ratio('ih Neumann(auto)')}× the floor",
      "`docs/results/speed/speed.json`: `ih Neumann(auto)`",
    ),
    (
      "a convex inner problem (ridge, logistic regression, a kernel method) and you want the"
      " exact hypergradient",
      "`ih.CG(steps=K)`",
      f"relative error after K = 20 products: CG {_error_at(ridge, 'CG', 20)} (ridge) and"
      f" {_error_at(logistic, 'CG', 20)} (logistic) vs Neumann with α = 1/λ_max"
      f" {_error_at(ridge, NEUMANN, 20)} and {_error_at(logistic, NEUMANN, 20)}; at K = 50 CG"
      f" is at {_error_at(ridge, 'CG', 50)} / {_error_at(logistic, 'CG', 50)}, Neumann still"
      f" {_error_at(ridge, NEUMANN, 100)} / {_error_at(logistic, NEUMANN, 100)} at K = 100",
      "`docs/results/accuracy/accuracy.json`",
    ),
    (
      "a network far from its optimum, with CG",
      "`ih.CG(ridge=...)`, or train the inner problem further",
      "CG stops at the first negative curvature of an indefinite H (`SolveInfo` says so); with"
      f" `ridge=1` it ran all its steps in {ratio('ih CG')}× the floor's time",
      "`docs/results/speed/speed.json`: `ih CG`, `library_solver_steps`",
    ),
    (
      "a network away from its minimum (indefinite Hessian), in the online loop",
      "`ih.MINRES(steps=K)`, or `ih.CG` with a `ridge` that makes H + ridge positive definite",
      f"on the {e2e['config']['num_hyperparams']:,}-weight overfitting problem, MINRES with 10"
      f" steps reached Neumann K = 20's validation loss with {vs('MINRES 10'):.2f}× its"
      f" Hessian-vector products (CG 10 with ridge {e2e['config']['cg_ridge']:g}:"
      f" {vs('CG 10'):.2f}×)",
      "`docs/results/end_to_end/end_to_end.json`",
    ),
    (
      "many solves on a slowly changing Hessian, spread-out spectrum",
      "`ih.CG(preconditioner=ih.NystromPreconditioner(rank=20, refresh_every=10))`",
      "on the benchmark ridge, worse than plain CG after 20 products"
      f" ({nystrom_20} vs {_error_at(ridge, 'CG', 20)}: one outlier eigenvalue, which plain CG"
      f" removes in one step), and in the online loop above {nystrom_online}: measure before"
      " choosing it",
      "`docs/results/accuracy/accuracy.json`; `docs/results/end_to_end/end_to_end.json`",
    ),
    (
      f"per-feature decays on a small regression ({inv['num_hyperparams']} decays)",
      "`ih.CG(steps=20)` or `ih.Direct()`",
      f"after {inv['hyper_steps']} hyper steps, cosine / relative error vs the exact"
      + " hypergradient: "
      + ", ".join(
        f"{label} {inv[f'{key}_cosine']:.3f} / {error(inv[f'{key}_rel_error'])}"
        for label, key in (
          ("CG 20 steps", "cg_20"),
          ("CG 5 steps", "cg_5"),
          ("Neumann 20 terms", "neumann_20"),
          ("Neumann 5 terms", "neumann_5"),
          ("Identity", "identity"),
        )
      ),
      "`docs/results/inverse_comparison/metrics.json` (`examples/inverse_comparison.py`)",
    ),
    (
      "non-symmetric operators (`ih.implicit_root`, fixed points)",
      "`ih.BiCGStab`, `ih.GMRES`",
      "exact on the tests' problems (GMRES in n steps)",
      "`tests/test_solvers.py`",
    ),
    (
      "a small problem (up to a few thousand parameters), or a reference to test against",
      "`ih.Direct()`: n products, then LU",
      f"{direct(ridge)} (ridge) and {direct(logistic)} (logistic) for"
      f" {ridge['num_hyperparameters']} parameters",
      "`docs/results/accuracy/accuracy.json`: `Direct`",
    ),
    (
      "the cheapest possible direction (one step of training), e.g. the paper's dataset"
      " distillation",
      "`ih.Identity(scale=...)`",
      f"cosine {inv['identity_cosine']:.2f} on the regression above: a rough direction, not a"
      " hypergradient",
      "`docs/results/inverse_comparison/metrics.json`",
    ),
    (
      "iMAML's proximal inner problem (H + λI)",
      "`ih.CG(steps=K)`",
      f"query MSE {imaml['imaml_mse']:.3f} vs {imaml['pretrain_mse']:.3f} for pretraining; CG met"
      f" negative curvature in {100 * imaml['cg_breakdown_fraction']:.1f}% of task solves and"
      " reported it",
      "`docs/results/imaml_sinusoid/metrics.json` (`examples/imaml_sinusoid.py`)",
    ),
    (
      "a jaxopt solver you already use",
      "pass the function as `solver=`",
      f"jaxopt's CG {ratio('jaxopt CG')}× and normal CG {ratio('jaxopt normal CG')}× the floor,"
      " because jaxopt's products are reverse-over-reverse"
      f" ({ratio_range(slower, 1)}× the time of forward-over-reverse here)",
      "`docs/results/speed/speed.json`: `jaxopt CG`, `jaxopt normal CG`, `product_costs`",
    ),
  ]
  table = ["| your situation | choose | measured evidence | source |", "|---|---|---|---|"]
  table += ["| " + " | ".join(row) + " |" for row in rows]
  machine = load("speed", "run.json")
  nystrom = ridge["curves"]["Nystrom"]["relative_error"][-1]
  return (
    f"Every number below is read from the published results in `docs/results/<run>/` (written"
    f" by `python -m tools.reproduce`; measured on {machine['machine']['cpu']},"
    f" {machine['machine']['cores']} cores, shared, jax {machine['jax']} on CPU); the last"
    " column names the file.\n\n"
    + "\n".join(table)
    + "\n\n`ih.Nystrom` used as a solver (no iteration) was the least accurate in these"
    f" measurements (relative error still {sci(nystrom)} on the benchmark ridge after"
    f" {ridge['curves']['Nystrom']['k'][-1]} products in `accuracy.json`): prefer it as a"
    " preconditioner."
  )
