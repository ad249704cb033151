"""The bilevel methods of implicit_hyper on benchopt's benchmark_bilevel problems, offline.

Problems (benchmarks/_bilevel_problems.py; ``--problem``, all of them without it):

  quadratic  benchopt's simulated quadratic, inner dimension 100, outer 10, 32,768
             training and 1,024 validation samples, mu_inner 0.1 (their quadratics.yml and
             quadratics_021424.yml), float64; the value function h and its minimum h* are
             known in closed form. (At mu_inner 1e-2 no method reaches 1e-6 in this budget:
             with steps that do not diverge, the slow inner and outer modes need 3e4 to 4e4
             iterations per 16 e-folds, 3 to 4 times the 12,500 SABA iterations of 4e6 calls.)
  cleaning   benchopt's hyper-cleaning (softmax regression, one weight sigmoid(lam_i) per
             training image, ridge 0.2 |theta|^2) on MNIST-5k, corruption 0.5, 0.7, 0.9.
  logreg     one L2 decay per pixel of a softmax regression on MNIST-5k (this project's).

Methods (batches of 64 everywhere, T = 10 inner steps and K = 10 products where they apply):

  neumann, cg, cg_nystrom  `ih.bilevel` (Algorithm 1) with `ih.Neumann`, warm-started CG
                           and CG preconditioned by `ih.NystromPreconditioner`
  unrolled                 `ih.bilevel(method="unrolled")` through the T inner steps
  soba, saba, srba         `ih.soba`, `ih.saba` (SAGA tables over fixed batches), `ih.srba`
                           (SARAH, full-batch restart every (n + m) / (2 batch) steps)
  soba_decay               `ih.soba` with SOBA's decreasing steps (the paper's Theorem 1):
                           rho_t = rho (t + 1)^(-2/5) on the weights, gamma_t = gamma
                           (t + 1)^(-3/5) on the hyperparameters (adjoint step rho)
  fsla                     `ih.fsla` (STORM-corrected hypergradient, momentum 0.5)
  amigo, stocbio, ttsa     `ih.amigo`, `ih.stocbio`, `ih.ttsa` (its products counted at
                           their mean, (K - 1) / 2 per iteration)
  amigo_decay              `ih.amigo` with the same two schedules (per hyper step)
  f2sa, bome, sama         the Hessian-free `ih.f2sa`, `ih.bome`, `ih.sama` (SGD inner)

Oracle calls are counted as benchopt's plotting code counts them: per sample, one per
gradient, Hessian-vector product or cross-derivative product, times the batch size (the
full set's size for a full-batch oracle); a method's calls per iteration are
`Method.calls` (inner, outer). SRBA is counted with both of its SARAH points and its
restarts (benchopt's table gives it SABA's 3 + 2, which undercounts it).

Tuning, benchopt's protocol: every method runs the same grid of an inner step rho =
c / L (c in STEP_FACTORS, L a bound of the minibatch Hessians) and an outer step rho / r
(r in RATIOS[problem]) on a tuning seed apart from the seeds, with the full budget, and
keeps the pair with the lowest final metric (suboptimality on quadratic, F otherwise;
the mean of the last three chunks); the adjoint and series steps are rho. Cleaning
is tuned at corruption 0.5 and the chosen steps are reused at 0.7 and 0.9. Cleaning and
logreg tune only the outer ratio at c = 1 (and cleaning runs 2e6 calls): what keeps each
default run near 15 minutes on 2 cores. Cleaning's best ratio for every method is the grid's
smallest, r = 1e-5; r = 1e-6 was measured worse on the tuning seed (final F of soba, saba
and cg 0.781, 0.776, 0.996 against 0.761, 0.759, 0.934 at r = 1e-5, 2e6 calls). On logreg
the best r of soba, saba, f2sa and cg is the grid's largest, 1e-2; r = 0.1 and 1 were
measured worse on the tuning seed (final F 0.377 / 0.381, 0.377 / 0.380, 0.374 / 0.380,
0.367 / 0.380 against 0.359, 0.359, 0.358, 0.303 at r = 1e-2).

Reported: quadratic h - h* and |grad h|^2; cleaning test error of the current weights and
validation loss; logreg F and test accuracy of the weights retrained by L-BFGS, and, for
the diagnosis, the median relative residual of each hyper step's adjoint solve. Curves
are the median over the seeds (band: min to max) against oracle calls and wall time (the
methods' own compiled chunks only). The tables give the oracle calls and seconds at which
the median run first reaches each target (quadratic: h - h* <= 1e-3 and 1e-6).

  python benchmarks/bilevel.py [--problem quadratic|cleaning|logreg] [--quick] [--out DIR]
"""

import math
import time
from pathlib import Path
from typing import NamedTuple

import jax

jax.config.update("jax_enable_x64", True)  # the quadratic problem runs in float64

import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import implicit_hyper as ih  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

try:
  import _bilevel_problems as problems
  import _common
except ImportError:  # imported as benchmarks.bilevel
  from benchmarks import _bilevel_problems as problems
  from benchmarks import _common

BATCH = problems.BATCH
T = K = 10
SKETCH_RANK = SKETCH_EVERY = 10  # cg_nystrom: products per sketch, hyper steps per sketch
PROBLEMS = ("quadratic", "cleaning", "logreg")
SEEDS = (0, 1, 2)
TUNING_SEED = 100
STEP_FACTORS = {"quadratic": (0.1, 1.0), "cleaning": (1.0,), "logreg": (1.0,)}
RATIOS = {
  "quadratic": (1.0, 10.0, 100.0),
  "cleaning": (1e-5, 1e-4, 1e-3),
  "logreg": (1e-5, 1e-4, 1e-3, 1e-2),
}
BUDGETS = {"quadratic": 4_000_000, "cleaning": 2_000_000, "logreg": 2_000_000}
CHUNKS = 100  # compiled calls of hyper steps per run
TARGETS = (1e-3, 1e-6)  # quadratic: suboptimality targets of the table


class Method(NamedTuple):
  """How the benchmark builds and feeds one method.

  `make(problem, rho, gamma)` returns the loop; `data` is "stacked" (``inner_args``
  leaves lead with `steps`), "indexed" (``(i, *batch)`` of a fixed partition), "single"
  (one batch) or "restart" (one batch, the full sets every `period` steps); `calls` are
  the per-sample oracle calls of one iteration, (inner, outer).
  """

  make: callable
  data: str
  steps: int
  calls: tuple[float, float]


@ih.solver_pytree()
class TruncatedCG(ih.CG):
  """`ih.CG` that calls only a non-finite answer or negative curvature diverged.

  CG minimises the error in the A-norm, not the residual: on an ill-conditioned Hessian
  the residual can exceed ``||b||`` while the answer improves, which `ih.CG` reports as
  diverged and `ih.bilevel` then skips (measured: every hyper step of logreg).
  """

  def compute(self, matvec, b, state):
    x, info, state = super().compute(matvec, b, state)
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(x)]))
    return x, info._replace(diverged=info.negative_curvature | ~finite), state


def algorithm_1(solver):
  def make(p, rho, gamma):
    return ih.bilevel(
      p.inner_loss,
      p.outer_loss,
      optax.sgd(rho),
      optax.sgd(gamma),
      inner_steps=T,
      solver=solver(rho),
      method="implicit" if solver(rho) is not None else "unrolled",
      hparam_transform=p.hparam_transform,
    )

  return make


INNER_DECAY, OUTER_DECAY = 0.4, 0.6  # SOBA's Theorem 1: t^(-2/5) and t^(-3/5)


def decay(step: float, exponent: float):
  """benchopt's decreasing schedule ``step / (t + 1)^exponent`` (t: optax's update count)."""
  return lambda count: step / (count + 1.0) ** exponent


def period(p) -> int:
  return max(1, (len(p.train[0]) + len(p.val[0])) // (2 * BATCH))


def batches(p):
  return len(p.train[0]) // BATCH, len(p.val[0]) // BATCH


nystrom = ih.NystromPreconditioner(rank=SKETCH_RANK, refresh_every=SKETCH_EVERY)
METHODS = {
  "neumann": Method(
    algorithm_1(lambda rho: ih.Neumann(steps=K, alpha=rho)), "stacked", T, (T + K + 1, 2)
  ),
  "cg": Method(algorithm_1(lambda rho: TruncatedCG(steps=K)), "stacked", T, (T + K + 2, 2)),
  "cg_nystrom": Method(
    algorithm_1(lambda rho: TruncatedCG(steps=K, preconditioner=nystrom)),
    "stacked",
    T,
    (T + K + 2 + SKETCH_RANK // SKETCH_EVERY, 2),
  ),
  "unrolled": Method(algorithm_1(lambda rho: None), "stacked", T, (3 * T, 2)),
  "soba": Method(
    lambda p, rho, gamma: ih.soba(
      p.inner_loss, p.outer_loss, inner_lr=rho, outer_lr=gamma, hparam_transform=p.hparam_transform
    ),
    "stacked",
    1,
    (3, 2),
  ),
  "saba": Method(
    lambda p, rho, gamma: ih.saba(
      p.inner_loss,
      p.outer_loss,
      num_inner_batches=batches(p)[0],
      num_outer_batches=batches(p)[1],
      inner_lr=rho,
      outer_lr=gamma,
      hparam_transform=p.hparam_transform,
    ),
    "indexed",
    0,
    (3, 2),
  ),
  "srba": Method(
    lambda p, rho, gamma: ih.srba(
      p.inner_loss,
      p.outer_loss,
      period=period(p),
      inner_lr=rho,
      outer_lr=gamma,
      hparam_transform=p.hparam_transform,
    ),
    "restart",
    0,
    (6, 4),
  ),
  "soba_decay": Method(
    lambda p, rho, gamma: ih.soba(
      p.inner_loss,
      p.outer_loss,
      inner_lr=decay(rho, INNER_DECAY),
      outer_lr=decay(gamma, OUTER_DECAY),
      adjoint_lr=rho,
      hparam_transform=p.hparam_transform,
    ),
    "stacked",
    1,
    (3, 2),
  ),
  "amigo": Method(
    lambda p, rho, gamma: ih.amigo(
      p.inner_loss,
      p.outer_loss,
      optax.sgd(rho),
      optax.sgd(gamma),
      inner_steps=T,
      adjoint_steps=K,
      adjoint_lr=rho,
      hparam_transform=p.hparam_transform,
    ),
    "stacked",
    T,
    (T + K + 1, 2),
  ),
  "fsla": Method(
    lambda p, rho, gamma: ih.fsla(
      p.inner_loss,
      p.outer_loss,
      inner_lr=rho,
      outer_lr=gamma,
      hparam_transform=p.hparam_transform,
    ),
    "single",
    0,
    (4, 4),
  ),
  "amigo_decay": Method(
    lambda p, rho, gamma: ih.amigo(
      p.inner_loss,
      p.outer_loss,
      optax.sgd(decay(rho, INNER_DECAY)),
      optax.sgd(decay(gamma, OUTER_DECAY)),
      inner_steps=T,
      adjoint_steps=K,
      adjoint_lr=rho,
      hparam_transform=p.hparam_transform,
    ),
    "stacked",
    T,
    (T + K + 1, 2),
  ),
  "stocbio": Method(
    lambda p, rho, gamma: ih.stocbio(
      p.inner_loss,
      p.outer_loss,
      inner_lr=rho,
      outer_lr=gamma,
      inner_steps=T,
      neumann_steps=K,
      hparam_transform=p.hparam_transform,
    ),
    "stacked",
    T + K + 1,
    (T + K + 1, 2),
  ),
  "ttsa": Method(
    lambda p, rho, gamma: ih.ttsa(
      p.inner_loss,
      p.outer_loss,
      inner_lr=rho,
      outer_lr=gamma,
      neumann_steps=K,
      hparam_transform=p.hparam_transform,
    ),
    "stacked",
    K + 2,
    (2 + (K - 1) / 2, 2),  # p ~ U{0..K-1} products: (K - 1) / 2 on average
  ),
  "f2sa": Method(
    lambda p, rho, gamma: ih.f2sa(
      p.inner_loss,
      p.outer_loss,
      inner_lr=rho,
      outer_lr=gamma,
      inner_steps=T,
      penalty_growth=1.0,
      penalty_max=1e4,
      hparam_transform=p.hparam_transform,
    ),
    "stacked",
    T,
    (2 * T + 2, T + 1),
  ),
  "bome": Method(
    lambda p, rho, gamma: ih.bome(
      p.inner_loss,
      p.outer_loss,
      inner_lr=rho,
      weights_lr=rho,
      outer_lr=gamma,
      inner_steps=T,
      hparam_transform=p.hparam_transform,
    ),
    "stacked",
    T,
    (T + 3, 2),
  ),
  "sama": Method(
    lambda p, rho, gamma: ih.sama(
      p.inner_loss,
      p.outer_loss,
      optax.sgd(rho),
      optax.sgd(gamma),
      inner_steps=T,
      hparam_transform=p.hparam_transform,
    ),
    "stacked",
    T,
    (T + 2, 2),
  ),
}


def sampler(p, method: Method):
  """``sample(key) -> (inner_args, outer_args)`` for one iteration of `method`, on the device."""
  n, m = len(p.train[0]), len(p.val[0])
  extra = lambda rows: (rows,) if p.index else ()
  if method.data == "indexed":

    def sample(key):
      i, j = (
        jax.random.randint(k, (), 0, c)
        for k, c in zip(jax.random.split(key), batches(p), strict=True)
      )
      rows = i * BATCH + jnp.arange(BATCH)  # fixed batches: the data are in random order
      val_rows = j * BATCH + jnp.arange(BATCH)
      inner = (i, *(a[rows] for a in p.train), *extra(rows))
      return inner, (j, *(a[val_rows] for a in p.val))

    return sample
  shape = (BATCH,) if method.data in ("restart", "single") else (method.steps, BATCH)

  def sample(key):
    inner_key, outer_key = jax.random.split(key)
    rows = jax.random.randint(inner_key, shape, 0, n)
    val_rows = jax.random.randint(outer_key, (BATCH,), 0, m)
    return (*(a[rows] for a in p.train), *extra(rows)), tuple(a[val_rows] for a in p.val)

  return sample


class Runner:
  """Runs the methods on one problem with one budget, compiling each (method, steps) once."""

  def __init__(self, p, *, budget: int, chunks: int, checkpoints: int | None):
    self.problem, self.budget, self.chunks = p, budget, chunks
    spaced = np.geomspace(1, chunks, checkpoints).round().astype(int) if checkpoints else None
    self.checkpoints = set(range(1, chunks + 1)) if spaced is None else set(spaced.tolist())
    self.compiled = {}
    self.start = p.evaluate(p.params, p.hparams, None)

  def calls_per_step(self, name: str) -> int:
    inner, outer = METHODS[name].calls
    return (inner + outer) * BATCH

  def advance(self, name: str, rho: float, gamma: float):
    """``(loop, advance, calls)``: `advance(state, key)` runs one compiled chunk."""
    if (name, rho, gamma) in self.compiled:
      return self.compiled[name, rho, gamma]
    p, method = self.problem, METHODS[name]
    loop = method.make(p, rho, gamma)
    sample = sampler(p, method)
    if method.data == "restart":
      length = period(p) - 1
      full = (*p.train, *((jnp.arange(len(p.train[0])),) if p.index else ())), p.val
      restart_calls = 3 * len(p.train[0]) + 2 * len(p.val[0])
    else:
      length = max(1, round(self.budget / self.chunks / self.calls_per_step(name)))
      restart_calls = 0

    def advance(state, key):
      if method.data == "restart":
        state, _ = loop.step(state, *full)

      def body(state, key):
        state, metrics = loop.step(state, *sample(key))
        return state, metrics.residual_norm

      state, residuals = jax.lax.scan(body, state, jax.random.split(key, length))
      return state, jnp.median(residuals)

    state = loop.init(p.params, p.hparams)
    compiled = jax.jit(advance).lower(state, jax.random.key(0)).compile()
    calls = length * self.calls_per_step(name) + restart_calls
    self.compiled[name, rho, gamma] = loop, compiled, calls
    return loop, compiled, calls

  def run(self, name: str, rho: float, gamma: float, seed: int, *, tuning: bool = False):
    """One run: the records (calls, seconds, the problem's metrics) at the checkpoints.

    A tuning run evaluates only its last three chunks (all its score needs).
    """
    loop, advance, calls = self.advance(name, rho, gamma)
    p = self.problem
    state = loop.init(p.params, p.hparams)
    key = jax.random.key(seed)
    record, warm = self.start
    records = [{"calls": 0, "seconds": 0.0, "residual": math.nan, **record}]
    seconds, chunks = 0.0, max(1, round(self.budget / calls))
    for index in range(1, chunks + 1):
      begin = time.perf_counter()
      state, residual = jax.block_until_ready(advance(state, jax.random.fold_in(key, index)))
      seconds += time.perf_counter() - begin
      checkpoint = round(index * self.chunks / chunks) in self.checkpoints
      if (index > chunks - 3) if tuning else (checkpoint or index == chunks):
        record, warm = p.evaluate(state.params, state.hparams, warm)
        extra = {"residual": float(residual)}
        records.append({"calls": index * calls, "seconds": seconds, **extra, **record})
    return records, int(state.num_skipped)

  def tune(self, name: str, grid, score_key: str):
    """The (rho, gamma) of `grid` with the lowest final `score_key` on the tuning seed."""
    scores = {}
    for rho, gamma in grid:
      records, _ = self.run(name, rho, gamma, TUNING_SEED, tuning=True)
      final = float(np.mean([r[score_key] for r in records[-3:]]))
      scores[rho, gamma] = final if np.isfinite(final) else math.inf
    return min(scores, key=scores.get), scores


def first_hit(records_per_seed, key: str, target: float) -> dict:
  """Median over seeds of the first checkpoint's calls and seconds with ``key <= target``.

  A seed that never gets there counts as infinitely slow; fewer than half: not reached.
  """
  hits = [next((r for r in records if r[key] <= target), None) for records in records_per_seed]
  reached = [h for h in hits if h is not None]
  result = {"seeds_reaching": len(reached), "seeds": len(hits)}
  if 2 * len(reached) > len(hits):
    pad = [math.inf] * (len(hits) - len(reached))
    result["calls"] = float(np.median([h["calls"] for h in reached] + pad))
    result["seconds"] = float(np.median([h["seconds"] for h in reached] + pad))
  return result


def finite_or_none(value):
  """JSON has no infinity: non-finite numbers (and those in containers) become None."""
  if isinstance(value, dict):
    return {str(k): finite_or_none(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [finite_or_none(v) for v in value]
  if isinstance(value, float | np.floating) and not np.isfinite(value):
    return None
  return value


def format_hit(hit: dict) -> str:
  if "calls" in hit and np.isfinite(hit["calls"]):
    return f"{hit['calls']:.3g} / {_common.format_seconds(hit['seconds'])}"
  return f"not reached ({hit['seeds_reaching']}/{hit['seeds']})"


def summarise(runs: dict, metrics: tuple[str, ...], targets: dict) -> dict:
  """Per method: median final metrics, skipped hyper steps, calls and time to each target."""
  summary = {}
  for name, seeds in runs.items():
    finals = [records[-1] for records, _ in seeds]
    summary[name] = {
      **{f"final_{k}": float(np.median([f[k] for f in finals])) for k in metrics},
      "skipped_hyper_steps": [skipped for _, skipped in seeds],
      "median_residual": float(
        np.nanmedian([r["residual"] for records, _ in seeds for r in records])
      ),
      **{
        label: first_hit([records for records, _ in seeds], key, value)
        for label, (key, value) in targets.items()
      },
    }
  return summary


PLOTTED = {
  "quadratic": ("suboptimality", "grad_norm_sq"),
  "cleaning": ("test_error", "outer"),
  "logreg": ("outer", "residual"),
}


def plot(name: str, results: dict, path: Path) -> Path:
  """One row per (variant, metric), one column per x-axis (oracle calls, seconds); log scales."""
  rows = [(variant, metric) for variant in results for metric in PLOTTED[name]]
  fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.0 * len(rows)), squeeze=False)
  for row, (variant, metric) in zip(axes, rows, strict=True):
    runs = results[variant]["runs"]
    for column, x_key in zip(row, ("calls", "seconds"), strict=True):
      for i, (method, seeds) in enumerate(runs.items()):
        table = lambda k, seeds=seeds: np.array([[r[k] for r in rec[1:]] for rec in seeds], float)
        values, xs = table(metric), np.median(table(x_key), 0)
        style = dict(color=f"C{i % 10}", ls="-" if i < 10 else "--")
        column.plot(xs, np.median(values, 0), label=method, **style)
        column.fill_between(
          xs, values.min(0), values.max(0), alpha=0.15, lw=0, color=style["color"]
        )
      reference = results[variant].get("reference")
      if reference is not None and metric == ("test_error" if name == "cleaning" else "outer"):
        column.axhline(reference[1], color="k", ls=":", lw=1, label=reference[0])
      column.set_xscale("log")
      column.set_yscale("log")
      column.set_xlabel("oracle calls (per sample)" if x_key == "calls" else "wall time (s)")
      column.set_ylabel(metric)
      column.set_title(variant, fontsize=9)
      column.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7, ncol=2)
  fig.suptitle(f"{name}: median over the seeds, band = min to max")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=70)
  plt.close(fig)
  return path


def grid_of(p, name: str) -> list[tuple[float, float]]:
  """(rho, gamma) pairs: rho = c / L for c in STEP_FACTORS, gamma = rho / r for r in RATIOS."""
  return [(c / p.lipschitz, c / p.lipschitz / r) for c in STEP_FACTORS[name] for r in RATIOS[name]]


def tune_and_run(p, runner, grid, seeds, score_key, methods, tuned=None):
  """Tunes every method on `grid` (unless `tuned` gives its steps) and runs the seeds."""
  chosen, scores, runs = {}, {}, {}
  for name in methods:
    if tuned is None:
      print(f"{p.name} / {name}: tuning on {len(grid)} step pairs", flush=True)
      chosen[name], scores[name] = runner.tune(name, grid, score_key)
    else:
      chosen[name] = tuned[name]
    runs[name] = [runner.run(name, *chosen[name], seed) for seed in seeds]
  return chosen, scores, runs


def report(p, chosen, summary, columns) -> None:
  rows = []
  for name, s in summary.items():
    rho, gamma = chosen[name]
    row = [name, f"{rho:.3g}", f"{gamma:.3g}"]
    row += [
      f"{s[f'final_{k}']:.3g}"
      for k in columns
      if k in ("suboptimality", "grad_norm_sq", "test_error", "test_acc", "outer")
    ]
    row += [format_hit(s[k]) for k in columns if k.startswith("to ")]
    rows.append([*row, sum(s["skipped_hyper_steps"])])
  headers = [
    "method",
    "inner step",
    "outer step",
    *[f"final {k}" if not k.startswith("to ") else f"{k} (calls / time)" for k in columns],
  ]
  print(f"\n{p.name}")
  _common.print_table([*headers, "skipped"], rows)


def quadratic(args, settings) -> dict:
  results = {}
  for mu in (0.1,):
    sizes = dict(n_inner=2048, n_outer=256) if args.quick else {}
    p = problems.quadratic_problem(mu=mu, **sizes)
    runner = Runner(p, budget=settings["budget"], chunks=settings["chunks"], checkpoints=None)
    grid = settings["grid"](p, "quadratic")
    chosen, scores, runs = tune_and_run(
      p, runner, grid, settings["seeds"], "suboptimality", args.methods
    )
    targets = {f"to {t:g}": ("suboptimality", t) for t in TARGETS}
    summary = summarise(runs, ("suboptimality", "grad_norm_sq"), targets)
    report(p, chosen, summary, ("suboptimality", "grad_norm_sq", *targets))
    results[p.name] = {
      "chosen": chosen,
      "tuning": scores,
      "results": summary,
      "runs": {k: [r for r, _ in v] for k, v in runs.items()},
      "lipschitz": p.lipschitz,
    }
  return results


def cleaning(args, settings) -> dict:
  results, tuned = {}, None
  for ratio in (0.5,) if args.quick else (0.5, 0.7, 0.9):
    sizes = dict(sizes=(300, 200, 300)) if args.quick else {}
    p = problems.cleaning_problem(ratio=ratio, **sizes)
    runner = Runner(p, budget=settings["budget"], chunks=settings["chunks"], checkpoints=None)
    grid = settings["grid"](p, "cleaning")
    chosen, scores, runs = tune_and_run(
      p, runner, grid, settings["seeds"], "outer", args.methods, tuned
    )
    tuned = chosen
    soba = runs.get("soba", next(iter(runs.values())))
    soba_final = float(np.median([r[-1]["test_error"] for r, _ in soba]))
    targets = {
      "to SOBA's final test error": ("test_error", soba_final),
      "to 1 point of the reference": ("test_error", p.reference[1] + 0.01),
    }
    summary = summarise(runs, ("test_error", "outer"), targets)
    report(p, chosen, summary, ("test_error", "outer", *targets))
    print(f"reference ({p.reference[0]}): test error {p.reference[1]:.4f}")
    results[p.name] = {
      "chosen": chosen,
      "tuning": scores,
      "results": summary,
      "reference": p.reference,
      "runs": {k: [r for r, _ in v] for k, v in runs.items()},
      "lipschitz": p.lipschitz,
    }
  return results


def logreg(args, settings) -> dict:
  p = problems.logreg_problem(**(dict(sizes=(300, 200, 300)) if args.quick else {}))
  runner = Runner(
    p, budget=settings["budget"], chunks=settings["chunks"], checkpoints=16 if not args.quick else 3
  )
  grid = settings["grid"](p, "logreg")
  chosen, scores, runs = tune_and_run(p, runner, grid, settings["seeds"], "outer", args.methods)
  start = runner.start[0]["outer"]
  best = min(float(np.median([r[-1]["outer"] for r, _ in seeds])) for seeds in runs.values())
  target = start - 0.9 * (start - best)
  targets = {
    "to 90% of the best decrease": ("outer", target),
    "to the reference": ("outer", p.reference[1]),
  }
  summary = summarise(runs, ("outer", "test_acc"), targets)
  report(p, chosen, summary, ("outer", "test_acc", *targets))
  print(f"reference ({p.reference[0]}): F = {p.reference[1]:.4f}; target F = {target:.4f}")
  return {
    "logreg": {
      "chosen": chosen,
      "tuning": scores,
      "results": summary,
      "reference": p.reference,
      "target": target,
      "runs": {k: [r for r, _ in v] for k, v in runs.items()},
      "lipschitz": p.lipschitz,
    }
  }


def main(argv=None):
  parser = _common.common_args(__doc__.splitlines()[0])
  parser.add_argument("--problem", choices=PROBLEMS, default=None, help="all when omitted")
  parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
  args = parser.parse_args(argv)
  args.methods = args.methods.split(",")
  unknown = sorted(set(args.methods) - set(METHODS))
  if unknown:
    parser.error(f"unknown --methods {unknown}; choose from {list(METHODS)}")
  for name in (args.problem,) if args.problem else PROBLEMS:
    begin = time.perf_counter()
    settings = {
      "budget": BUDGETS[name],
      "chunks": CHUNKS,
      "seeds": SEEDS,
      "grid": grid_of,
    }
    if args.quick:  # one step pair, a small budget, few chunks, two seeds
      settings.update(budget=60_000, chunks=4, seeds=SEEDS[:2])
      settings["grid"] = lambda p, name: grid_of(p, name)[-2:-1]
    results = {"quadratic": quadratic, "cleaning": cleaning, "logreg": logreg}[name](args, settings)
    payload = {
      "machine": _common.machine(),
      "problem": name,
      "settings": {
        "budget": settings["budget"],
        "chunks": settings["chunks"],
        "seeds": list(settings["seeds"]),
        "tuning_seed": TUNING_SEED,
        "step_factors": list(STEP_FACTORS[name]),
        "ratios": list(RATIOS[name]),
        "batch": BATCH,
        "inner_steps": T,
        "solver_steps": K,
        "calls_per_iteration": {k: list(m.calls) for k, m in METHODS.items()},
        "quick": args.quick,
      },
      "results": {k: v["results"] for k, v in results.items()},
      "problems": {
        k: {kk: vv for kk, vv in v.items() if kk != "results"} for k, v in results.items()
      },
      "seconds": time.perf_counter() - begin,
    }
    _common.write_json(args.out, f"bilevel_{name}", finite_or_none(payload))
    print(f"wrote {plot(name, payload['problems'], args.out / f'bilevel_{name}.png')}")
    print(f"{name}: total {payload['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
  main()
