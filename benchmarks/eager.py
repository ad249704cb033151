"""Eager speed: `jax.grad` through a decorated solver without `jit`, as in a notebook.

The inner problem is ridge regression solved in closed form (``jnp.linalg.solve``) on
Gaussian data, with the validation loss on a second batch. Four calls of the gradient
with respect to the ridge penalty are timed in interleaved rounds:

* ``plain eager``: `jax.grad` differentiating the closed form itself, op by op;
* ``decorated eager``: the same closed form under `ih.implicit_argmin` with `ih.CG`,
  whose backward pass is the implicit function theorem (compiled once per computation
  and call site, then reused);
* ``decorated eager, new globals``: the same, with a training batch the loss reads from a
  module-level variable replaced before every call (the result must follow it);
* ``decorated jit``: the decorated gradient under `jax.jit`.

It prints the medians, the ratio of each to plain eager, and the first call (tracing and
compilation) of each, and checks that the decorated gradient matches the plain one.

  python benchmarks/eager.py            # d = 10, 100 features
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

import implicit_hyper as ih

try:
  import _common
except ImportError:  # imported as benchmarks.eager
  from benchmarks import _common

# The training batch that `read_global_loss` reads at every call, as notebook code does.
TRAIN_BATCH: tuple = ()


def loss(w, lam, x, y):
  return jnp.mean((x @ w - y) ** 2) + lam * jnp.sum(w**2)


def ridge_closed_form(w0, lam, x, y):
  """``argmin_w loss(w, lam, x, y)``, exactly."""
  del w0
  n, d = x.shape
  return jnp.linalg.solve(x.T @ x / n + lam * jnp.eye(d), x.T @ y / n)


def validation(solve, val):
  x_val, y_val = val

  def value(lam, x, y):
    w = solve(jnp.zeros(x.shape[1]), lam, x, y)
    return jnp.mean((x_val @ w - y_val) ** 2)

  return jax.grad(value)


def read_global_loss(w, lam):
  return loss(w, lam, *TRAIN_BATCH)


def make_data(n: int, d: int, seed: int):
  rng = np.random.default_rng(seed)
  w_true = rng.normal(size=d)
  batches = []
  for _ in range(3):
    x = rng.normal(size=(n, d))
    batches.append((jnp.asarray(x), jnp.asarray(x @ w_true + 0.5 * rng.normal(size=n))))
  return batches


def measure(d: int, rounds: int) -> dict:
  train, val, other = make_data(4 * d, d, seed=d)
  solver = ih.CG(steps=2 * d)
  decorated = ih.implicit_argmin(loss, solver=solver)(ridge_closed_form)
  plain = validation(ridge_closed_form, val)
  grad = validation(decorated, val)
  jitted = jax.jit(grad)

  @ih.implicit_argmin(read_global_loss, solver=solver)
  def from_globals(w0, lam):
    return ridge_closed_form(w0, lam, *TRAIN_BATCH)

  x_val, y_val = val
  global_grad = jax.grad(
    lambda lam: jnp.mean((x_val @ from_globals(jnp.zeros(d), lam) - y_val) ** 2)
  )

  def with_new_globals():
    global TRAIN_BATCH
    TRAIN_BATCH = other if TRAIN_BATCH is train else train
    return global_grad(0.1)

  calls = {
    "plain eager": lambda: plain(0.1, *train),
    "decorated eager": lambda: grad(0.1, *train),
    "decorated eager, new globals": with_new_globals,
    "decorated jit": lambda: jitted(0.1, *train),
  }
  first = {}
  for name, call in calls.items():
    start = time.perf_counter()
    _common.block(call())
    first[name] = time.perf_counter() - start
  samples, outputs = _common.time_interleaved(calls, rounds=rounds)
  seconds = {name: _common.median(s) for name, s in samples.items()}
  expected = float(outputs["plain eager"])
  errors = {
    "decorated eager": abs(float(outputs["decorated eager"]) - expected),
    "decorated jit": abs(float(outputs["decorated jit"]) - expected),
  }
  for batch in (train, other):  # the decorated gradient follows the global batch
    global TRAIN_BATCH
    TRAIN_BATCH = batch
    error = abs(float(global_grad(0.1)) - float(plain(0.1, *batch)))
    errors["new globals"] = max(errors.get("new globals", 0.0), error)
  return {
    "features": d,
    "samples": 4 * d,
    "seconds": seconds,
    "first_call_seconds": first,
    "ratio_to_plain_eager": {k: v / seconds["plain eager"] for k, v in seconds.items()},
    "abs_error_to_plain": errors,
  }


def main(argv=None):
  parser = _common.common_args(__doc__.splitlines()[0])
  parser.add_argument("--features", type=int, nargs="+", default=[10, 100])
  parser.add_argument("--rounds", type=int, default=30)
  args = parser.parse_args(argv)
  jax.config.update("jax_enable_x64", True)
  features, rounds = ([5], 3) if args.quick else (args.features, args.rounds)
  results = [measure(d, rounds) for d in features]
  names = list(results[0]["seconds"])
  rows = []
  for r in results:
    for name in names:
      rows.append(
        [
          r["features"],
          name,
          _common.format_seconds(r["seconds"][name]),
          f"{r['ratio_to_plain_eager'][name]:.2f}x",
          _common.format_seconds(r["first_call_seconds"][name]),
        ]
      )
  _common.print_table(["features", "call", "median", "/ plain eager", "first call"], rows)
  worst = max(e for r in results for e in r["abs_error_to_plain"].values())
  print(f"largest |decorated - plain| gradient difference: {worst:.2e}")
  _common.write_json(
    args.out, "eager", {"machine": _common.machine(), "rounds": rounds, "results": results}
  )


if __name__ == "__main__":
  main()
