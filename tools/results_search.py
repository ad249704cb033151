"""The blocks of benchmarks/overhead.py and benchmarks/search.py, from their published runs.

Each function returns one `<!-- NAME:begin -->` block; see tools/render_results.py. The
verdict sentences are computed from the numbers, so they change when the numbers do.
"""

from tools._results import load
from tools._results import seconds
from tools._results import wall

METHOD_NAMES = {"hypergradient": "hypergradient descent", "TPE": "Optuna TPE", "random": "random"}


def _machine(name: str) -> str:
  run = load(name, "run.json")
  before = run["machine"]["load_average_before"][0]
  after = run["machine"]["load_average_1_5_15"][0]
  return (
    f"`{' '.join(run['command'])}` ({wall(name)}) on {run['machine']['cpu']}"
    f" ({run['machine']['cores']} cores, shared: load average {before:.1f} at the start,"
    f" {after:.1f} at the end), jax {run['jax']}, commit {run['git_commit'][:7]}"
  )


def _compiled(counts: dict) -> str:
  if set(counts.values()) == {1}:
    return "each jitted step compiled once over the run"
  return "recompiled: " + ", ".join(f"{k} {n} times" for k, n in counts.items() if n != 1)


def overhead_table() -> str:
  """Measured t(bilevel step) / t(plain T steps) beside the floor (T + cK + 2) / T."""
  payload = load("overhead", "overhead.json")
  parts = [f"Run: {_machine('overhead')}."]
  for r in payload["results"]:
    compiles = [p["compile_seconds"] for p in r["points"]]
    parts.append(
      f"\n**{r['model'].upper()}**, {r['weights']:,} weights and as many decays; one gradient"
      f" {seconds(r['gradient_seconds'])}, one Hessian-vector product"
      f" {seconds(r['hvp_seconds'])} (c = {r['c']:.2f}); {r['rounds']} interleaved rounds;"
      f" {_compiled(r['compilations_per_step'])},"
      f" {sum(r['host_callbacks'].values())} host callbacks in their programs; compile time of a"
      " bilevel step"
      f" {min(compiles):.1f}-{max(compiles):.1f} s (not in the ratios).\n"
    )
    rows = [
      "| T | K | plain T steps | bilevel step | measured ratio | floor (T + cK + 2)/T |"
      " measured / floor |",
      "|---|---|---|---|---|---|---|",
    ]
    for p in r["points"]:
      rows.append(
        f"| {p['inner_steps']} | {p['solver_steps']} | {seconds(p['plain_seconds'])}"
        f" | {seconds(p['bilevel_seconds'])} | {p['measured_ratio']:.2f}"
        f" | {p['floor']:.2f} | {p['measured_over_floor']:.2f} |"
      )
    parts.append("\n".join(rows))
  worst = payload["worst_measured_over_floor"]
  lowest = min(p["measured_over_floor"] for r in payload["results"] for p in r["points"])
  verdict = "met" if worst <= payload["target"] else "missed"
  parts.append(
    f"\nWorst measured / floor: {worst:.2f} (target {payload['target']:.2f}: {verdict})."
    " Ratios are medians over rounds of the ratio within a round."
  )
  if lowest < 1:
    parts[-1] += (
      f" The lowest, {lowest:.2f}, is below what the floor allows: it is timing noise under"
      f" the machine's load, so deviations of {1 - lowest:.2f} either way are not resolved"
      " by this run."
    )
  return "\n".join(parts)


def _cell(m: dict) -> str:
  return (
    f"{m['median_best_val']:.4g} [{m['min_best_val']:.4g}, {m['max_best_val']:.4g}]"
    f"; {m['median_test']:.3f}; {m['median_evaluations']:.0f}"
  )


def search_table(figure: str = "results/search/search.png") -> str:
  """Best validation loss at equal wall time per problem and method (median [range])."""
  payload = load("search", "search.json")
  methods = payload["methods"]
  rows = [
    "| problem | hyperparameters | budget per run | "
    + " | ".join(METHOD_NAMES[m] for m in methods)
    + " | lowest median |",
    "|---|---|---|" + "---|" * len(methods) + "---|",
  ]
  for row in payload["results"]:
    cells = [_cell(row["methods"][m]) for m in methods]
    rows.append(
      f"| {row['problem']} | {row['hyperparameters']:,} | {row['budget_seconds']:.3g} s | "
      + " | ".join(cells)
      + f" | {METHOD_NAMES.get(row['winner'], row['winner'])} |"
    )
  return (
    f"Run: {_machine('search')}; {payload['seeds']} seeds per problem. Each cell: best"
    " validation loss at the end of the budget, median [min, max] over seeds; the test metric"
    " (accuracy, or MSE for diabetes) of the configuration that reached it, median; the"
    " configurations evaluated (hyper steps for hypergradient descent), median. Compilation"
    " is not in the budget.\n\n"
    + "\n".join(rows)
    + "\n\n![Best validation loss against wall time, median and range over seeds]"
    f"({figure})"
  )


def benchmarks_search_table() -> str:
  """`search_table` for benchmarks/README.md, whose figure path starts one folder up."""
  return search_table("../docs/results/search/search.png")


def _margin(row: dict) -> str:
  """`problem (n): 0.31 against 0.49 for the best search`."""
  search = min(v["median_best_val"] for m, v in row["methods"].items() if m != "hypergradient")
  return (
    f"{row['problem']} ({row['hyperparameters']:,}), "
    f"{row['methods']['hypergradient']['median_best_val']:.4g} against {search:.4g} for the"
    " better search"
  )


def search_verdict() -> str:
  """Which method wins from how many hyperparameters, in sentences from the numbers."""
  results = sorted(load("search", "search.json")["results"], key=lambda r: r["hyperparameters"])
  name = lambda row: f"{row['problem']} ({row['hyperparameters']:,})"  # noqa: E731
  won = [r for r in results if r["winner"] == "hypergradient"]
  lost = [r for r in results if r["winner"] in ("TPE", "random")]
  tied = [r for r in results if "tie" in r["winner"]]
  always = [
    r["hyperparameters"]
    for r in results
    if all(
      s["winner"] == "hypergradient"
      for s in results
      if s["hyperparameters"] >= r["hyperparameters"]
    )
  ]
  lines = []
  if always:
    lines.append(
      f"- From {min(always):,} hyperparameters up, hypergradient descent reaches the lowest"
      " median validation loss on every problem: "
      + "; ".join(_margin(r) for r in won if r["hyperparameters"] >= min(always))
      + "."
    )
  for r in lost:
    best = r["methods"][r["winner"]]
    hyper = r["methods"]["hypergradient"]
    lines.append(
      f"- Search wins on {name(r)}: {METHOD_NAMES[r['winner']]} {best['median_best_val']:.4g}"
      f" against {hyper['median_best_val']:.4g} for hypergradient descent"
      f" ({hyper['median_evaluations']:.0f} hyper steps against"
      f" {best['median_evaluations']:.0f} trials in the same time)."
    )
  for r in tied:
    times = ", ".join(
      f"{METHOD_NAMES[m]} {v['median_seconds_to_best']:.2g} s" for m, v in r["methods"].items()
    )
    tied_names = ", ".join(METHOD_NAMES[m] for m in r["winner"].removeprefix("tie: ").split(", "))
    lines.append(
      f"- A tie between {tied_names} on {name(r)} (medians within 0.5%); median time to come"
      f" within 0.5% of each seed's best: {times}."
    )
  below = [r for r in won if not always or r["hyperparameters"] < min(always)]
  if below:
    lines.append(f"- Hypergradient descent also wins on {', '.join(name(r) for r in below)}.")
  return "\n".join(lines)


def eager_table() -> str:
  """benchmarks/eager.py: `jax.grad` through a decorated solver without `jit`, against plain JAX."""
  payload = load("eager", "eager.json")
  rows = [
    f"Run: `python benchmarks/eager.py` ({wall('eager')}), median of {payload['rounds']} rounds.",
    "",
    "| features | plain eager | decorated eager | decorated eager, new globals | decorated jit |",
    "|---|---|---|---|---|",
  ]
  calls = ("plain eager", "decorated eager", "decorated eager, new globals", "decorated jit")
  for r in payload["results"]:
    cells = [f"{seconds(r['seconds'][c])} ({r['ratio_to_plain_eager'][c]:.2f}x)" for c in calls]
    rows.append(f"| {r['features']} | " + " | ".join(cells) + " |")
  worst = max(r["ratio_to_plain_eager"][c] for r in payload["results"] for c in calls[1:3])
  error = max(e for r in payload["results"] for e in r["abs_error_to_plain"].values())
  rows.append(
    f"\nDecorated eager calls take at most {worst:.2f}x plain eager JAX (the target: 3x); the"
    f" gradients agree with plain JAX to {error:.1e}."
  )
  return "\n".join(rows)
