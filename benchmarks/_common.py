"""What the benchmarks share: the MLP with one weight decay per weight, timing, output.

The model is a one-hidden-layer ReLU network without biases on scikit-learn's digits
(64 inputs, 10 classes), so a hidden width h gives ``74 h`` weights, each with its own
decay ``exp(log_decay)``:

  L_T(w, log_decay) = CE(w; training batch) + sum(exp(log_decay) * w^2)
  L_V(w)            = CE(w; validation batch)
"""

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

import implicit_hyper as ih

NUM_FEATURES = 64
NUM_CLASSES = 10
# A scratch folder git ignores: the published results in docs/results/ are written only by
# `python -m tools.reproduce`, with their run.json, so a run by hand leaves them as they are.
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "out" / "benchmarks"


class Problem(NamedTuple):
  """One hypergradient problem: weights, per-weight log decays and two batches."""

  params: dict
  log_decay: dict
  train: tuple
  val: tuple


def num_weights(hidden: int) -> int:
  """The number of weights (and of hyperparameters) of the MLP of width `hidden`."""
  return (NUM_FEATURES + NUM_CLASSES) * hidden


def hidden_for(weights: float) -> int:
  """The hidden width whose MLP has about `weights` weights."""
  return max(1, round(weights / (NUM_FEATURES + NUM_CLASSES)))


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits: 1797 images of 8 x 8 pixels in 0..16, and their labels.

  Read from the file scikit-learn ships without importing scikit-learn, whose import
  takes seconds in every fresh subprocess of the memory and scale benchmarks.
  """
  package = importlib.util.find_spec("sklearn").submodule_search_locations[0]
  data = np.loadtxt(Path(package) / "datasets" / "data" / "digits.csv.gz", delimiter=",")
  return data[:, :-1], data[:, -1].astype(np.int32)


def make_problem(
  hidden: int, *, batch_size: int = 256, decay: float = 1e-3, seed: int = 0, dtype=jnp.float32
) -> Problem:
  """He-initialised weights, log decays ``log(decay)``, and disjoint train/val batches."""
  images, labels = load_digits()
  rng = np.random.default_rng(seed)
  rows = rng.permutation(len(labels))
  half = len(rows) // 2
  pick = lambda part: rng.choice(part, batch_size, replace=batch_size > len(part))
  # Arrays are cast on the host: `jnp.asarray(x, dtype)` would compile a conversion.
  dtype = np.dtype(dtype)
  batch = lambda idx: (jnp.asarray((images[idx] / 16.0).astype(dtype)), jnp.asarray(labels[idx]))
  he_normal = lambda fan_in, fan_out, gain: jnp.asarray(
    (rng.standard_normal((fan_in, fan_out)) * np.sqrt(gain / fan_in)).astype(dtype)
  )
  params = {
    "w1": he_normal(NUM_FEATURES, hidden, 2.0),
    "w2": he_normal(hidden, NUM_CLASSES, 1.0),
  }
  log_decay = jax.tree.map(lambda w: jnp.asarray(np.full(w.shape, np.log(decay), dtype)), params)
  return Problem(params, log_decay, batch(pick(rows[:half])), batch(pick(rows[half:])))


def cross_entropy(params, x, y):
  logits = jax.nn.relu(x @ params["w1"]) @ params["w2"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def inner_loss(params, log_decay, x, y):
  """Training loss: cross-entropy plus one L2 penalty ``exp(log_decay)`` per weight."""
  penalty = jax.tree.map(lambda w, ld: jnp.sum(jnp.exp(ld) * w**2), params, log_decay)
  return cross_entropy(params, x, y) + sum(jax.tree.leaves(penalty))


def outer_loss(params, log_decay, x, y):
  """Validation loss: cross-entropy; it does not depend on the decays directly."""
  del log_decay
  return cross_entropy(params, x, y)


def sgd_steps(params, log_decay, train, *, steps: int, lr: float, scan: bool):
  """`steps` steps of gradient descent on the training loss.

  With ``scan=True`` reverse mode keeps every step's residuals (unrolled differentiation);
  with ``scan=False`` a `fori_loop` keeps nothing (training before an implicit hypergradient).
  """
  step = lambda p: otu.tree_add_scale(p, -lr, jax.grad(inner_loss)(p, log_decay, *train))
  if scan:
    return jax.lax.scan(lambda p, _: (step(p), None), params, length=steps)[0]
  return jax.lax.fori_loop(0, steps, lambda _, p: step(p), params)


def library_hypergrad(params, log_decay, train, val, *, solver):
  """The hypergradient of the validation loss, its `SolveInfo` and the solver's state."""
  return ih.hypergrad_with_info(
    inner_loss,
    outer_loss,
    params,
    log_decay,
    inner_args=train,
    outer_args=val,
    solver=solver,
  )


def unrolled_hypergrad(params, log_decay, train, val, *, steps: int, lr: float):
  """Reverse-mode hypergradient through `steps` unrolled gradient-descent steps."""

  def validation_after_training(log_decay):
    trained = sgd_steps(params, log_decay, train, steps=steps, lr=lr, scan=True)
    return outer_loss(trained, log_decay, *val)

  return jax.grad(validation_after_training)(log_decay)


def block(tree):
  """Waits for every array in `tree` to be computed; returns `tree`."""
  return jax.tree.map(lambda leaf: leaf.block_until_ready(), tree)


def time_interleaved(
  calls: dict, *, rounds: int, warmup: int = 1, budget_s: float = 0.0, max_rounds: int = 0
) -> tuple[dict, dict]:
  """Seconds per call for each zero-argument callable, timed in interleaved rounds.

  Every callable runs `warmup` >= 1 times first (compilation included). Then each round
  calls each one once, so load from other processes spreads evenly over the methods.
  After `rounds` rounds, more follow while less than `budget_s` seconds have passed,
  up to `max_rounds`: fast calls get more samples at little cost.
  Returns ``({name: [seconds, ...]}, {name: output of the last warm-up call})``.
  """
  outputs = {}
  for name, call in calls.items():
    for _ in range(warmup):
      outputs[name] = block(call())
  samples = {name: [] for name in calls}
  begin = time.perf_counter()
  done = 0
  while done < rounds or (done < max_rounds and time.perf_counter() - begin < budget_s):
    done += 1
    for name, call in calls.items():
      start = time.perf_counter()
      block(call())
      samples[name].append(time.perf_counter() - start)
  return samples, outputs


def all_finite(tree) -> bool:
  """Whether every leaf of `tree` is finite (checked on the host, compiling nothing)."""
  return all(bool(np.isfinite(np.asarray(leaf)).all()) for leaf in jax.tree.leaves(tree))


def cosine(a, b) -> float:
  """The cosine similarity of two pytrees, computed on the host; 0 when either is zero."""
  flat = lambda tree: np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])
  a, b = flat(a).astype(np.float64), flat(b).astype(np.float64)
  norms = np.linalg.norm(a) * np.linalg.norm(b)
  return float(a @ b / norms) if norms > 0 else 0.0


def median(samples) -> float:
  return statistics.median(samples)


def compiled_memory(fn, *args) -> dict:
  """XLA's memory analysis of ``jax.jit(fn)`` compiled for `args` (bytes)."""
  analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
  fields = ("argument", "output", "temp", "generated_code")
  sizes = {f"{f}_bytes": int(getattr(analysis, f"{f}_size_in_bytes", 0) or 0) for f in fields}
  sizes["total_bytes"] = sizes["argument_bytes"] + sizes["output_bytes"] + sizes["temp_bytes"]
  return sizes


def peak_memory_bytes() -> int | None:
  """Peak memory so far: the device's peak on an accelerator, else the process's peak RSS."""
  device = jax.devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    return stats.get("peak_bytes_in_use")
  scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in kB on Linux.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def run_in_subprocess(script: str, config: dict) -> dict:
  """Runs ``python script --child JSON`` in a fresh process; returns the JSON it prints last.

  A fresh process per configuration makes its peak memory that configuration's alone.
  """
  command = [sys.executable, script, "--child", json.dumps(config)]
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    raise RuntimeError(f"{Path(script).name} {config} failed:\n{done.stderr}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def difference(a, b):
  """``a - b``, or None when either is unknown (a device without memory statistics)."""
  return None if a is None or b is None else a - b


def machine() -> dict:
  """What the numbers were measured on."""
  device = jax.devices()[0]
  return {
    "jax": jax.__version__,
    "backend": device.platform,
    "device": device.device_kind,
    "cpu_count": os.cpu_count(),
    "processor": platform.processor() or platform.machine(),
    "python": platform.python_version(),
    "x64": bool(jax.config.jax_enable_x64),
  }


def common_args(description: str) -> argparse.ArgumentParser:
  """The options every benchmark takes: --quick, --out (and --child, internal)."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--quick", action="store_true", help="a tiny configuration (smoke test)")
  parser.add_argument(
    "--out", type=Path, default=DEFAULT_OUT, help="where to write results (default: out/benchmarks)"
  )
  parser.add_argument("--child", help=argparse.SUPPRESS)
  return parser


def write_json(out: Path, name: str, payload: dict) -> Path:
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"{name}.json"
  path.write_text(json.dumps(payload, indent=2) + "\n")
  print(f"wrote {path}")
  return path


def print_table(headers, rows) -> None:
  """Prints a markdown table."""
  cells = [[str(c) for c in row] for row in [headers, *rows]]
  widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
  line = lambda row: "| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |"
  print(line(cells[0]))
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for row in cells[1:]:
    print(line(row))


def format_seconds(seconds: float) -> str:
  if seconds < 1e-3:
    return f"{seconds * 1e6:.0f} us"
  if seconds < 1:
    return f"{seconds * 1e3:.3g} ms"
  return f"{seconds:.3g} s"


def format_bytes(size: float | None) -> str:
  if size is None:
    return "n/a"
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(size) < 1024 or unit == "GiB":
      return f"{size:.3g} {unit}" if unit != "B" else f"{size:.0f} B"
    size /= 1024
  raise AssertionError
