"""Regenerate every published result: each example's default run and each benchmark.

    python -m tools.reproduce                  # everything, into docs/results/<name>/
    python -m tools.reproduce --only speed     # a subset, by name
    python -m tools.reproduce --quick          # every run with --quick, into a temporary folder,
                                               # checking that each result file has its keys

Each run is its script in a fresh subprocess (as a user runs it: one host device, no XLA_FLAGS)
writing into an empty folder; its files replace `docs/results/<name>/`, next to `run.json` (the
command line, the library, JAX and Python versions, the git commit, the machine, the load average
and the wall time) and `stdout.txt` (the script's printed summary). Adding a result is one line
in `RUNS`. The README's tables are rendered from these files by `tools/render_results.py`.
"""

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
TIMEOUT_S = 3600  # a hang, not a slow machine: the longest default run takes minutes


@dataclasses.dataclass(frozen=True)
class Run:
  """One published result: `script` run with `args` (its `--quick` run adds `quick_args`).

  `files` maps each file the run must write to the keys it must hold (JSON) or to () (a figure;
  for a JSON list of records, the keys of its last record). `published` is False for a run
  whose results have not been generated and committed yet (the tests then do not ask for
  them); set it once `python -m tools.reproduce --only NAME` has written them.
  """

  name: str
  script: str
  args: tuple[str, ...] = ()
  files: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  quick_args: tuple[str, ...] = ()
  published: bool = True


OVERFIT = {
  "metrics.json": (
    "num_hyperparams",
    "train_acc",
    "val_acc",
    "test_acc",
    "untuned_val_acc",
    "untuned_test_acc",
    "seconds_per_hyper_step",
    "hyper_steps",
    "skipped_hyper_steps",
    "history",
  ),
  "overfit_validation.png": (),
}
MILLION = ("--width", "1000", "--hyper-steps", "200")
DISTILLATION = {
  "metrics.json": (
    "distilled_test_acc",
    "class_mean_test_acc",
    "random_real_test_acc",
    "num_hyperparams",
    "seconds",
  ),
  "distilled_images.png": (),
  "outer_loss.png": (),
}
BENCHMARK = ("machine", "results")

RUNS = [
  Run("overfit_validation", "examples/overfit_validation.py", files=OVERFIT),
  Run("overfit_validation_seed1", "examples/overfit_validation.py", ("--seed", "1"), OVERFIT),
  Run("overfit_validation_seed2", "examples/overfit_validation.py", ("--seed", "2"), OVERFIT),
  Run("overfit_million", "examples/overfit_validation.py", MILLION, OVERFIT, ("--width", "64")),
  Run(
    "overfit_million_seed1", "examples/overfit_validation.py", (*MILLION, "--seed", "1"), OVERFIT
  ),
  Run(
    "overfit_million_seed2", "examples/overfit_validation.py", (*MILLION, "--seed", "2"), OVERFIT
  ),
  Run(
    "overfit_mnist",
    "examples/overfit_validation.py",
    ("--dataset", "mnist", *MILLION),
    OVERFIT,
    ("--dataset", "mnist", "--width", "64"),
  ),
  Run("dataset_distillation", "examples/dataset_distillation.py", files=DISTILLATION),
  Run(
    "dataset_distillation_mnist",
    "examples/dataset_distillation.py",
    ("--dataset", "mnist"),
    DISTILLATION,
    ("--dataset", "mnist"),
  ),
  Run(
    "dataset_distillation_mlp", "examples/dataset_distillation.py", ("--model", "mlp"), DISTILLATION
  ),
  Run(
    "dataset_distillation_mnist_mlp",
    "examples/dataset_distillation.py",
    ("--dataset", "mnist", "--model", "mlp"),
    DISTILLATION,
    ("--dataset", "mnist", "--model", "mlp"),
  ),
  Run(
    "learned_augmentation",
    "examples/learned_augmentation.py",
    files={
      "metrics.json": (
        "aug_test_acc_mean",
        "aug_test_acc_std",
        "noaug_test_acc_mean",
        "noaug_test_acc_std",
        "noise_test_acc_mean",
        "noise_test_acc_std",
        "noise_std",
        "frozen_test_acc_mean",
        "vs_noise_gain_mean",
        "vs_noise_gain_std",
        "vs_frozen_gain_mean",
        "vs_frozen_gain_std",
        "learned",
        "num_hyperparams",
        "seeds",
        "runs",
      ),
      "learned_augmentation.png": (),
    },
  ),
  Run(
    "inverse_comparison",
    "examples/inverse_comparison.py",
    files={
      "metrics.json": (
        "identity_cosine",
        "identity_rel_error",
        *(
          f"{m}_{k}_{v}"
          for m in ("neumann", "cg")
          for k in (5, 20)
          for v in ("cosine", "rel_error")
        ),
        "num_hyperparams",
        "hyper_steps",
      ),
      "inverse_comparison.png": (),
    },
  ),
  Run(
    "imaml_sinusoid",
    "examples/imaml_sinusoid.py",
    files={
      "metrics.json": ("imaml_mse", "pretrain_mse", "cg_breakdown_fraction", "eval_tasks"),
      "imaml_sinusoid.png": (),
      "meta_training.png": (),
    },
  ),
  Run(
    "hyper_cleaning",
    "examples/hyper_cleaning.py",
    files={
      "metrics.json": ("test_acc", "detection", "gap_to_oracle", "seconds_per_hyper_step", "sizes"),
      "hyper_cleaning.png": (),
    },
  ),
  *(
    Run(
      f"hyper_cleaning_seed{seed}",
      "examples/hyper_cleaning.py",
      ("--seed", str(seed)),
      {"metrics.json": ("test_acc", "detection", "gap_to_oracle")},
    )
    for seed in (1, 2)
  ),
  Run(
    "bilevel_quickstart",
    "examples/bilevel_quickstart.py",
    files={"metrics.json": ("step", "outer_loss", "num_skipped")},
  ),
  Run(
    "nonunique_inner",
    "examples/nonunique_inner.py",
    files={"nonunique_inner.json": ("lam_A_gap_between_inits", "f2sa/zero", "bome/zero")},
  ),
  Run(
    "data_parallel",
    "examples/data_parallel.py",
    files={"metrics.json": ("devices", "test_accuracy", "skipped_hyper_steps", "hyper_steps")},
  ),
  Run("speed", "benchmarks/speed.py", files={"speed.json": BENCHMARK}),
  Run("memory", "benchmarks/memory.py", files={"memory.json": BENCHMARK}),
  Run("accuracy", "benchmarks/accuracy.py", files={"accuracy.json": BENCHMARK, "accuracy.png": ()}),
  Run("scale", "benchmarks/scale.py", files={"scale.json": BENCHMARK, "scale.png": ()}),
  Run("rule_speed", "benchmarks/rule_speed.py", files={"stdout.txt": ()}),
  Run(
    "end_to_end",
    "benchmarks/end_to_end.py",
    files={"end_to_end.json": BENCHMARK, "end_to_end.png": ()},
  ),
  *(
    Run(
      f"bilevel_{problem}",
      "benchmarks/bilevel.py",
      ("--problem", problem),
      {f"bilevel_{problem}.json": BENCHMARK, f"bilevel_{problem}.png": ()},
      ("--problem", problem),
    )
    for problem in ("quadratic", "logreg", "cleaning")
  ),
  Run("overhead", "benchmarks/overhead.py", files={"overhead.json": BENCHMARK}),
  Run("search", "benchmarks/search.py", files={"search.json": BENCHMARK, "search.png": ()}),
  Run("eager", "benchmarks/eager.py", files={"eager.json": BENCHMARK}),
]


def missing_keys(path: Path, keys: tuple[str, ...]) -> list[str]:
  """The entries of `keys` that the JSON file at `path` lacks (in its last record if a list)."""
  payload = json.loads(path.read_text())
  if isinstance(payload, list):
    payload = payload[-1] if payload else {}
  return [key for key in keys if key not in payload]


def check_files(run: Run, out: Path) -> list[str]:
  """Problems with the files `run` wrote to `out`: missing files and missing keys."""
  problems = []
  for name, keys in run.files.items():
    path = out / name
    if not path.is_file():
      problems.append(f"{run.name}: missing {name}")
    elif name.endswith(".png") and path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
      problems.append(f"{run.name}: {name} is not a PNG")
    elif name.endswith(".json") and (absent := missing_keys(path, keys)):
      problems.append(f"{run.name}: {name} lacks {', '.join(absent)}")
  return problems


def _git(*args: str) -> str:
  result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
  return result.stdout.strip()


def machine() -> dict:
  """CPU model and cores, the OS and the load average now."""
  model = platform.processor()
  cpuinfo = Path("/proc/cpuinfo")
  if cpuinfo.exists():
    names = [
      ln.split(":", 1)[1].strip()
      for ln in cpuinfo.read_text().splitlines()
      if ln.startswith("model name")
    ]
    model = names[0] if names else model
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  return {
    "cpu": model,
    "cores": os.cpu_count(),
    "system": platform.platform(),
    "load_average_1_5_15": load,
  }


def provenance() -> dict:
  """What every run.json shares: the library, JAX and Python versions."""
  import jax
  import jaxlib

  import implicit_hyper

  return {
    "implicit_hyper": implicit_hyper.__version__,
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "python": platform.python_version(),
  }


def run_one(run: Run, out: Path, *, quick: bool, shared: dict) -> dict:
  """Run `run` into the empty folder `out`; write its stdout.txt and run.json; return run.json."""
  command = [sys.executable, run.script, *(("--quick", *run.quick_args) if quick else run.args)]
  command += ["--out", str(out)]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user runs it
  out.mkdir(parents=True)
  load_before = machine()["load_average_1_5_15"]
  # When the script starts: the tree may move on during a long run.
  commit, edited = _git("rev-parse", "HEAD"), bool(_git("status", "--porcelain", "--", run.script))
  start = time.perf_counter()
  result = subprocess.run(
    command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
  )
  seconds = time.perf_counter() - start
  (out / "stdout.txt").write_text(result.stdout)
  record = {
    "name": run.name,
    "command": ["python", run.script, *command[2:-2]],
    "returncode": result.returncode,
    "wall_seconds": round(seconds, 1),
    "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    **shared,
    "git_commit": commit,
    "script_modified_since_commit": edited,
    "machine": machine() | {"load_average_before": load_before},
  }
  (out / "run.json").write_text(json.dumps(record, indent=2) + "\n")
  if result.returncode != 0:
    print(result.stderr[-4000:], file=sys.stderr)
  return record


def publish(scratch: Path, target: Path) -> None:
  """Replace `target` by the files (not folders: checkpoints) that a run left in `scratch`."""
  if target.exists():
    shutil.rmtree(target)
  target.mkdir(parents=True)
  for path in scratch.iterdir():
    if path.is_file():
      shutil.copy2(path, target / path.name)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny runs into a temporary folder")
  parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these (names in RUNS)")
  parser.add_argument("--results", type=Path, default=RESULTS, help="default: docs/results")
  args = parser.parse_args(argv)
  names = [run.name for run in RUNS]
  unknown = sorted(set(args.only or ()) - set(names))
  if unknown:
    parser.error(f"unknown --only {unknown}; choose from {names}")
  runs = [run for run in RUNS if args.only is None or run.name in args.only]
  shared = provenance()
  problems, skipped, start = [], [], time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="reproduce-") as tmp:
    for run in runs:
      if not (ROOT / run.script).exists():
        skipped.append(run.name)
        print(f"-- {run.name}: {run.script} is not in this checkout; skipped", flush=True)
        continue
      scratch = Path(tmp) / run.name
      print(
        f"-- {run.name}: {run.script} {' '.join(run.quick_args if args.quick else run.args)}",
        flush=True,
      )
      record = run_one(run, scratch, quick=args.quick, shared=shared)
      found = (
        check_files(run, scratch)
        if record["returncode"] == 0
        else [f"{run.name}: exit {record['returncode']}"]
      )
      problems += found
      print(
        f"   {record['wall_seconds']:.0f} s, {'ok' if not found else '; '.join(found)}", flush=True
      )
      if not args.quick and record["returncode"] == 0:
        publish(scratch, args.results / run.name)
  total = time.perf_counter() - start
  print(f"{len(runs) - len(skipped)} runs in {total:.0f} s; skipped {skipped or 'none'}")
  for problem in problems:
    print(f"FAILED {problem}", file=sys.stderr)
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
