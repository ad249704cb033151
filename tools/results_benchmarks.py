"""The benchmarks' published runs, rendered: the README's benchmark block.

Every number is read from `docs/results/<benchmark>/`; see tools/render_results.py.
"""

import statistics

from tools import results_bilevel as bilevel
from tools._results import RESULTS
from tools._results import load
from tools._results import mebibytes
from tools._results import seconds

SPEED_COLUMNS = (
  ("hand-written floor", "floor"),
  ("`ih` Neumann", "ih Neumann(alpha)"),
  ("`ih` Neumann, α=None", "ih Neumann(auto)"),
  ("`ih` CG", "ih CG"),
  ("jaxopt CG", "jaxopt CG"),
  ("jaxopt normal CG", "jaxopt normal CG"),
  ("unrolled 20 SGD steps", "unrolled 20 steps"),
)


def speed_table() -> str:
  payload = load("speed", "speed.json")
  rows = [
    "| weights | " + " | ".join(label for label, _ in SPEED_COLUMNS) + " |",
    "|---" * (len(SPEED_COLUMNS) + 1) + "|",
  ]
  for result in payload["results"]:
    cells = []
    for _, key in SPEED_COLUMNS:
      value = result["seconds"].get(key)
      cell = "n/a" if value is None else seconds(value)
      if key == "ih Neumann(alpha)":
        cell += f" ({result['ratio_to_floor'][key]:.2f}×)"
      cells.append(cell)
    rows.append(f"| {result['weights']:,} | " + " | ".join(cells) + " |")
  largest = payload["results"][-1]
  time = lambda key: largest["seconds"].get(key)  # noqa: E731
  costs = [r["product_costs"] for r in payload["results"]]
  slower = [
    c["reverse-over-reverse"]["seconds"] / c["forward-over-reverse"]["seconds"] for c in costs
  ]
  auto = time("ih Neumann(auto)") / time("ih Neumann(alpha)")
  note = "\n\n(× = median ratio to the floor within the same run.)"
  if time("jaxopt CG"):
    note += (
      f" At {largest['weights']:,} weights the Neumann hypergradient takes"
      f" {time('ih Neumann(alpha)') / time('jaxopt CG'):.2f}× jaxopt's CG time: jaxopt computes"
      " each Hessian-vector product reverse-over-reverse, which on this machine takes"
      f" {min(slower):.1f}-{max(slower):.1f}× as long for the same flops as the"
      " forward-over-reverse product used here."
    )
  note += (
    f" `alpha=None` costs {auto:.1f}× as much: it estimates λ_max at every call; cache the"
    " step, as `ih.bilevel` does (`refresh_every`), or fix `alpha`."
  )
  return "\n".join(rows) + note


def memory_line() -> str:
  memory = load("memory", "memory.json")
  by = {(r["method"], r["steps"]): r["xla_total_bytes"] for r in memory["results"]}
  steps = sorted({s for _, s in by})
  implicit = " / ".join(mebibytes(by["implicit", s]) for s in steps)
  unrolled = " / ".join(mebibytes(by["unrolled", s]) for s in steps)
  return (
    f"- **Memory** (`python benchmarks/memory.py`): after T = {' / '.join(map(str, steps))}"
    f" training steps the implicit hypergradient's compiled program needs {implicit};"
    f" unrolled differentiation needs {unrolled} ({memory['weights']:,} weights)."
  )


def accuracy_line() -> str:
  accuracy = {r["problem"]: r["curves"] for r in load("accuracy", "accuracy.json")["results"]}

  def at(problem, method):
    curve = accuracy[problem][method]
    return " / ".join(f"{curve['relative_error'][curve['k'].index(k)]:.2g}" for k in (20, 100))

  neumann = "Neumann(alpha=1/lambda_max)"
  return (
    "- **Accuracy** (`python benchmarks/accuracy.py`, float64, 640 hyperparameters on digits):"
    f" relative error after K = 20 / 100 products: CG {at('ridge', 'CG')} (ridge) and"
    f" {at('logistic', 'CG')} (logistic); Neumann {at('ridge', neumann)} (ridge) and"
    f" {at('logistic', neumann)} (logistic). On convex problems CG is far better per product;"
    " the K-term Neumann series is what the paper uses, and equals differentiating K unrolled"
    " gradient steps from the optimum (Lorraine et al., Theorem 1)."
  )


def scale_line() -> str:
  scale = load("scale", "scale.json")["results"]
  big = [r for r in scale if r["hyperparameters"] >= 10**6] or scale
  per_hparam = statistics.median(r["xla_total_bytes"] / r["hyperparameters"] for r in big)
  sizes = ", ".join(
    f"{r['hyperparameters']:,} hyperparameters in {seconds(r['seconds'])}"
    f" ({r['seconds'] / r['gradient_seconds']:.0f} gradients' time)"
    for r in big
  )
  return (
    f"- **Scale** (`python benchmarks/scale.py`): one hypergradient of {sizes};"
    f" XLA's memory analysis about {per_hparam:.0f} bytes per hyperparameter."
  )


def benchmark_lines() -> str:
  """One line per benchmark; one not yet regenerated says how to regenerate it."""
  lines = []
  for name, line in (("memory", memory_line), ("accuracy", accuracy_line), ("scale", scale_line)):
    if (RESULTS / name / f"{name}.json").exists():
      lines.append(line())
    else:
      lines.append(
        f"- **{name.title()}**: not regenerated yet (`python -m tools.reproduce --only {name}`)."
      )
  lines.append(bilevel.bilevel_line())
  return "\n".join(lines)


def benchmarks_block() -> str:
  machine = load("speed", "run.json")["machine"]
  jax = load("speed", "speed.json")["machine"]["jax"]
  return (
    f"Measured on {machine['cpu']} ({machine['cores']} cores, shared with other jobs), jax {jax}"
    " on CPU, float32 except `accuracy.py` (float64). Details, commands and plots:"
    " [benchmarks/README.md](benchmarks/README.md); the files behind these numbers:"
    " [docs/results/](docs/results/).\n\nOne hypergradient of an MLP with one weight decay per"
    " weight, K = 20 Hessian-vector products, median of interleaved rounds"
    ' (`pip install -e ".[bench]" && python -m tools.reproduce --only speed`):\n\n'
    + speed_table()
    + "\n\n"
    + benchmark_lines()
  )
