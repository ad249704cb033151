"""benchmarks/bilevel.py's published runs, rendered: its tables, the README line, the choice table.

Every number is read from `docs/results/bilevel_<problem>/bilevel_<problem>.json`.
"""

import math

from tools._results import RESULTS
from tools._results import load
from tools._results import seconds
from tools._results import wall

PROBLEMS = {
  "quadratic": "benchopt's quadratic (closed-form value function)",
  "cleaning": "hyper-cleaning, MNIST-5k",
  "logreg": "per-feature L2 logistic regression, MNIST-5k",
}
FINALS = {  # result key -> column title
  "final_suboptimality": "final h − h*",
  "final_grad_norm_sq": "final ‖∇h‖²",
  "final_test_error": "final test error",
  "final_outer": "final F",
  "final_test_acc": "test accuracy (retrained)",
}


def published(problem: str) -> bool:
  """Whether the problem's results are committed in the current format (per-variant results)."""
  path = RESULTS / f"bilevel_{problem}" / f"bilevel_{problem}.json"
  return path.exists() and "problems" in data(problem)


def data(problem: str) -> dict:
  return load(f"bilevel_{problem}", f"bilevel_{problem}.json")


def hit(reached: dict) -> str:
  """Median oracle calls / seconds to a target, or how many seeds got there."""
  if reached.get("calls") is None or not math.isfinite(reached["calls"]):
    return f"not reached ({reached['seeds_reaching']}/{reached['seeds']})"
  return f"{reached['calls']:,.3g} / {seconds(reached['seconds'])}"


def number(value) -> str:
  return "diverged" if value is None or not math.isfinite(value) else f"{value:.3g}"


def variant_table(results: dict, chosen: dict, *, residual: bool) -> str:
  first = next(iter(results.values()))
  finals = [k for k in FINALS if k in first]
  targets = [k for k in first if k.startswith("to ")]
  headers = ["method", "inner step ρ", "outer step γ", *(FINALS[k] for k in finals)]
  headers += [f"{k} (calls / time)" for k in targets]
  headers += ["median adjoint residual"] * residual + ["skipped hyper steps"]
  rows = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  for method, r in results.items():
    rho, gamma = chosen[method]
    cells = [f"`{method}`", f"{rho:.3g}", f"{gamma:.3g}"]
    cells += [number(r[k]) for k in finals] + [hit(r[k]) for k in targets]
    if residual:
      cells.append(number(r["median_residual"]))
    cells.append(str(sum(r["skipped_hyper_steps"])))
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def verdict(problem: str, results: dict) -> str:
  """Which methods reach the problem's ranking target, and the final metric of the others."""
  target = TARGETS[problem]
  final = next(k for k in FINALS if k in next(iter(results.values())))
  order, never = ranked(results, target)
  missed = ", ".join(f"{m} {number(results[m.strip('`')][final])}" for m in never)
  line = f"Reach `{target}`: {', '.join(order) or 'none'}." + (
    f" Miss it ({FINALS[final]}): {missed}." if missed else ""
  )
  if problem == "cleaning" and {"soba", "saba", "srba"} <= set(results):
    soba = "to SOBA's final test error"
    line += (
      f" To SOBA's final test error ({number(results['soba']['final_test_error'])}):"
      f" `saba` {hit(results['saba'][soba])}, `srba` {hit(results['srba'][soba])},"
      f" `soba` {hit(results['soba'][soba])} (calls / time)."
    )
  return line


def problem_section(problem: str) -> str:
  payload = data(problem)
  settings = payload["settings"]
  head = (
    f"**{PROBLEMS[problem]}** (`python benchmarks/bilevel.py --problem {problem}`,"
    f" {wall(f'bilevel_{problem}')}): {settings['budget']:,} oracle calls per run, median over"
    f" {len(settings['seeds'])} seeds, steps tuned on seed {settings['tuning_seed']}"
    f" (ρ = c/L, c ∈ {settings['step_factors']}; γ = ρ/r, r ∈ {settings['ratios']})."
  )
  parts = [head]
  for variant, results in payload["results"].items():
    extra = payload["problems"][variant]
    line = f"*{variant}*"
    if extra.get("reference"):
      name, value = extra["reference"]
      kind = "test error" if problem == "cleaning" else "F"
      line += f"; {name}: {kind} {value:.4g}"
    if extra.get("target") is not None:
      line += f"; the 90% target: F ≤ {extra['target']:.4g}"
    parts.append(line + ".")
    parts.append(variant_table(results, extra["chosen"], residual=problem == "logreg"))
    parts.append(verdict(problem, results))
  parts.append(f"![{problem}](../docs/results/bilevel_{problem}/bilevel_{problem}.png)")
  return "\n\n".join(parts)


def bilevel_tables() -> str:
  """One section per problem whose results are committed."""
  return "\n\n".join(
    problem_section(p)
    if published(p)
    else f"**{PROBLEMS[p]}**: not generated yet (`python -m tools.reproduce --only bilevel_{p}`)."
    for p in PROBLEMS
  )


def first_variant(problem: str) -> tuple[str, dict]:
  return next(iter(data(problem)["results"].items()))


def ranked(results: dict, target: str) -> tuple[list[str], list[str]]:
  """Methods that reach `target` ordered by median calls, and those that do not."""
  reached = sorted(
    (r[target]["calls"], m)
    for m, r in results.items()
    if r[target].get("calls") is not None and math.isfinite(r[target]["calls"])
  )
  never = [m for m, r in results.items() if r[target].get("calls") is None]
  return [f"`{m}` ({calls:,.3g})" for calls, m in reached], [f"`{m}`" for m in never]


TARGETS = {  # the target each summary ranks by
  "quadratic": "to 1e-06",
  "cleaning": "to 1 point of the reference",
  "logreg": "to 90% of the best decrease",
}


def bilevel_line() -> str:
  """The README's line on benchmarks/bilevel.py."""
  cells, methods = [], set()
  for problem, target in TARGETS.items():
    if published(problem):
      variant, results = first_variant(problem)
      methods |= set(results)
      order, never = ranked(results, target)
      cells.append(f"{variant} {target}: {', '.join(order[:3]) or 'none'}")
  if not cells:
    return "- **Bilevel methods**: not generated yet (`python -m tools.reproduce --only bilevel`)."
  return (
    "- **Bilevel methods** (`python benchmarks/bilevel.py`, benchopt's problems rebuilt"
    f" offline, {len(methods)} methods, oracle calls counted as benchopt counts them),"
    " fastest to the target, median over 3 seeds: "
    + "; ".join(cells)
    + ". Tables and curves: [benchmarks/README.md](benchmarks/README.md#bilevel-methods-bilevelpy)."
  )


def bilevel_choice() -> str:
  """Per problem: the methods by oracle calls to the target, then those that never reach it."""
  rows = ["| problem, target | methods by oracle calls to the target (median) | never reached |"]
  rows.append("|---|---|---|")
  for problem, target in TARGETS.items():
    if not published(problem):
      continue
    variant, results = first_variant(problem)
    order, never = ranked(results, target)
    rows.append(f"| {variant}, {target} | {', '.join(order)} | {', '.join(never) or 'none'} |")
  return "\n".join(rows)


FIRST_ORDER = ("f2sa", "bome", "sama")


def first_order() -> str:
  """The Hessian-free methods next to the best method using products, per published problem."""
  rows = ["| problem, target | Hessian-free: oracle calls to the target | best with products |"]
  rows.append("|---|---|---|")
  for problem, target in TARGETS.items():
    if not published(problem):
      continue
    variant, results = first_variant(problem)
    free = ", ".join(f"`{m}` {hit(results[m][target])}" for m in FIRST_ORDER if m in results)
    others = {m: r for m, r in results.items() if m not in FIRST_ORDER}
    order, _ = ranked(others, target)
    rows.append(f"| {variant}, {target} | {free} | {order[0] if order else 'none reaches it'} |")
  return "\n".join(rows)


DIAGNOSED = ("soba", "soba_decay", "amigo", "amigo_decay", "cg")


def logreg_diagnosis() -> str:
  """SOBA and AmIGO on logreg: the tuning grid's scores, the chosen pair, the adjoint residual."""
  if not published("logreg"):
    return "Not generated yet (`python -m tools.reproduce --only bilevel_logreg`)."
  payload = data("logreg")
  variant, results = first_variant("logreg")
  extra = payload["problems"][variant]
  ratios = payload["settings"]["ratios"]
  headers = ["method", *(f"final F at r = {r:g}" for r in ratios), "chosen r"]
  headers += ["median adjoint residual", "to 90% of the best decrease"]
  rows = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  for method in DIAGNOSED:
    if method not in results:
      continue
    scores = extra["tuning"][method]  # "(rho, gamma)" -> final F on the tuning seed
    by_ratio = {}
    for key, value in scores.items():
      rho, gamma = (float(v) for v in key.strip("()").split(","))
      by_ratio[round(rho / gamma, 12)] = value
    rho, gamma = extra["chosen"][method]
    cells = [f"`{method}`", *(number(by_ratio.get(round(r, 12))) for r in ratios)]
    cells += [f"{rho / gamma:g}", number(results[method]["median_residual"])]
    cells.append(hit(results[method]["to 90% of the best decrease"]))
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)
