"""benchmarks/README.md's tables, rendered from the benchmarks' published runs in docs/results/.

Each function returns one `<!-- NAME:begin -->` block; see tools/render_results.py.
"""

import statistics

from tools._results import flops
from tools._results import load
from tools._results import mebibytes
from tools._results import ratio_range
from tools._results import sci
from tools._results import seconds
from tools._results import wall

SPEED_METHODS = (
  "floor",
  "ih Neumann(alpha)",
  "ih Neumann(auto)",
  "ih CG",
  "ih MINRES",
  "ih Nystrom",
  "jaxopt CG",
  "jaxopt normal CG",
  "unrolled 20 steps",
  "one gradient",
)


def _run_line(name: str) -> str:
  run = load(name, "run.json")
  machine, before = run["machine"], run["machine"]["load_average_before"][0]
  return (
    f"`{' '.join(run['command'])}`: {wall(name)} on {machine['cpu']} ({machine['cores']} cores,"
    f" shared: load average {before:.1f} at the start), jax {run['jax']}, {run['date'][:10]},"
    f" commit {run['git_commit'][:7]}."
  )


def _table(headers, rows) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def speed_tables() -> str:
  results = load("speed", "speed.json")["results"]
  methods = [m for m in SPEED_METHODS if m in results[0]["seconds"]]
  rounds = ", ".join(str(len(r["samples"]["floor"])) for r in results)
  cell = lambda value, fmt: "n/a" if value is None else fmt(value)  # noqa: E731
  parts = [f"Run: {_run_line('speed')} Median time per hypergradient (rounds: {rounds}):"]
  rows = [
    [f"{r['weights']:,}"] + [cell(r["seconds"].get(m), seconds) for m in methods] for r in results
  ]
  parts.append(_table(["weights", *methods], rows))
  for title, key in (
    ("Ratio to the floor", "ratio_to_floor"),
    ("Ratio to jaxopt CG", "ratio_to_jaxopt CG"),
  ):
    if key not in results[0]:
      continue
    rows = [
      [f"{r['weights']:,}"] + [cell(r[key].get(m), lambda v: f"{v:.2f}") for m in methods]
      for r in results
    ]
    parts += [f"{title}:", _table(["weights", *methods], rows)]
  neumann = [r["ratio_to_floor"]["ih Neumann(alpha)"] for r in results]
  cosines = [r["cosine_neumann_to_floor"] for r in results]
  steps = {s for r in results for s in r["library_solver_steps"].values()}
  last = results[-1]
  parts.append(
    f"The library's Neumann hypergradient takes {ratio_range(neumann)}× the floor's time and"
    f" equals it (cosine similarity {ratio_range(cosines, 6)}); every `ih` solver ran"
    f" {', '.join(map(str, sorted(steps)))} steps at every width. At {last['weights']:,} weights it"
    f" takes {last['ratio_to_jaxopt CG']['ih Neumann(alpha)']:.2f}× jaxopt's CG time."
  )
  return "\n\n".join(parts)


def product_costs_table() -> str:
  rows = []
  for r in load("speed", "speed.json")["results"]:
    costs = r["product_costs"]
    rows.append(
      [f"{r['weights']:,}"]
      + [f"{flops(c['flops'])} flops, {seconds(c['seconds'])}" for c in costs.values()]
    )
  headers = [
    "weights",
    "gradient",
    "HVP forward-over-reverse",
    "HVP reverse-over-reverse (linearised once)",
  ]
  return _table(headers, rows)


def memory_table() -> str:
  memory = load("memory", "memory.json")
  rows = [
    [
      r["method"],
      r["steps"],
      mebibytes(r["xla_temp_bytes"]),
      mebibytes(r["xla_total_bytes"]),
      mebibytes(r["peak_bytes"]),
      mebibytes(r["peak_bytes"] - r["peak_before_bytes"]),
    ]
    for r in memory["results"]
  ]
  headers = [
    "method",
    "T",
    "XLA temp",
    "XLA args + out + temp",
    "peak RSS",
    "peak RSS − RSS before compiling",
  ]
  return (
    f"Run: {_run_line('memory')} {memory['weights']:,} weights (width {memory['hidden']}), step"
    f" {memory['lr']:g}, Neumann with K = {memory['neumann_steps']}:\n\n" + _table(headers, rows)
  )


ACCURACY_METHODS = {
  "Neumann(alpha)": "Neumann(alpha=1/lambda_max)",
  "Neumann(auto)": "Neumann(alpha=None)",
  "CG": "CG",
  "MINRES": "MINRES",
  "CG + Nyström": "CG+Nystrom",
  "Nyström": "Nystrom",
}
ACCURACY_K = (5, 10, 20, 50, 100)


def accuracy_table() -> str:
  results = load("accuracy", "accuracy.json")["results"]
  rows = []
  for r in results:
    for label, key in ACCURACY_METHODS.items():
      curve = r["curves"].get(key)
      if curve is None:
        continue
      at = [curve["k"].index(k) for k in ACCURACY_K]
      rows.append(
        [r["problem"], label]
        + [f"{sci(curve['relative_error'][i])} ({seconds(curve['seconds'][i])})" for i in at]
      )
  direct = ", ".join(
    f"{seconds(r['curves']['Direct']['seconds'][-1])} ({r['problem']})"
    for r in results
    if "Direct" in r["curves"]
  )
  headers = ["problem", "method", *(f"K = {k}" for k in ACCURACY_K)]
  return (
    f"Run: {_run_line('accuracy')}\n\n"
    + _table(headers, rows)
    + f"\n\nThe exact solve (`ih.Direct()`, one product per parameter and an LU factorisation)"
    f" takes {direct}."
  )


def scale_table() -> str:
  results = load("scale", "scale.json")["results"]
  rows = [
    [
      f"{r['hyperparameters']:,}",
      seconds(r["seconds"]),
      seconds(r["gradient_seconds"]),
      f"{r['seconds'] / r['gradient_seconds']:.1f}",
      mebibytes(r["xla_total_bytes"]),
      mebibytes(r["peak_bytes"]),
      mebibytes(r["peak_bytes"] - r["peak_before_bytes"]),
      "yes" if r["diverged"] else "no",
    ]
    for r in results
  ]
  headers = ["hyperparameters", "hypergradient", "one gradient", "hypergradient / gradient"]
  headers += ["XLA args + out + temp", "peak RSS", "peak RSS − before compiling", "series diverged"]
  per = statistics.median(r["xla_total_bytes"] / r["hyperparameters"] for r in results[-2:])
  return (
    f"Run: {_run_line('scale')} Median of up to {load('scale', 'scale.json')['max_runs']}"
    " calls per size:\n\n"
    + _table(headers, rows)
    + f"\n\nAt the two largest sizes XLA's analysis needs about {per:.0f} bytes per hyperparameter."
  )


def end_to_end_table() -> str:
  data = load("end_to_end", "end_to_end.json")
  results, reference = data["results"], next(iter(data["results"].values()))
  rows = []
  for name, r in results.items():
    reached = r["products_to_target"] is not None
    rows.append(
      [
        name,
        f"{r['products_per_hyper_step']:.1f}",
        r["hyper_steps_to_target"] if reached else "not reached",
        f"{r['products_to_target']:,}" if reached else "-",
        f"{r['products_to_target'] / reference['products_to_target']:.2f}" if reached else "-",
        seconds(r["seconds_to_target"]) if reached else "-",
        f"{r['final_validation_loss']:.4f}",
        f"{r['val_acc']:.2f} / {r['test_acc']:.3f}",
        r["skipped_hyper_steps"],
      ]
    )
  headers = ["method", "products / hyper step", "hyper steps to target", "products to target"]
  headers += ["vs Neumann", "wall time to target", "final val loss", "final val / test acc"]
  config = data["config"]
  return (
    f"Run: {_run_line('end_to_end')} {config['num_hyperparams']:,} weights and decays,"
    f" {config['hyper_steps']:,} hyper steps; target: validation loss"
    f" {data['target_validation_loss']:.4f}; CG ridge {config['cg_ridge']:g}, Nyström damping"
    f" {config['nystrom_ridge']:.3g}.\n\n" + _table([*headers, "skipped"], rows)
  )
