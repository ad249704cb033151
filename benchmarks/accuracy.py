"""Accuracy: how close Neumann and CG hypergradients come to the exact one, per step and per second.

Two convex problems on scikit-learn's digits (half for training, half for validation),
in float64, each with one weight decay per weight (``exp(log_decay) = DECAY``):

  ridge      least squares on one-hot labels, W (64 x 10); the exact hypergradient
             differentiates the closed-form solution ``(X^T X / n + 2 diag(decay)) W = X^T Y / n``
  logistic   multinomial logistic regression, W (64 x 10), solved by Newton's method to
             machine precision; the exact hypergradient is `ih.hypergrad_with_info` with
             `ih.Direct()`

For K in 0..100, the hypergradient with `Neumann(steps=K, alpha=1/lambda_max)` (the
exact largest Hessian eigenvalue), `Neumann(steps=K)` (alpha by power iteration) and
`CG(steps=K, tol=0)`: relative error ``||g - g*|| / ||g*||``, cosine similarity, and
the median wall time of a jitted call, since a CG step and the power iteration cost more.

The newer solvers at the same K products per solve: `MINRES(steps=K-1)` and
`GMRES(steps=K-1)` (one more product for the reported residual), `Nystrom(rank=K-1,
ridge=lambda_max/100)` (its damping rho, so it approximates ``(H + rho I)^{-1}``), and
`CG(steps=K - ceil(K/5), preconditioner=NystromPreconditioner(rank=2K,
refresh_every=10))`, whose sketch of 2K products is amortised over the 10 solves that
reuse it (the error of every reusing solve is that of the first here, the Hessian being
fixed; the time includes the sketch).

  python benchmarks/accuracy.py
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

import implicit_hyper as ih

try:
  import _common
except ImportError:  # imported as benchmarks.accuracy
  from benchmarks import _common

DECAY = 1e-2
NUM_CLASSES = _common.NUM_CLASSES
K_GRID = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 70, 80, 90, 100)


def digits_halves(seed: int = 0):
  """``((x, y), (x, y))``: two random halves of digits, pixels scaled to [0, 1]."""
  images, labels = _common.load_digits()
  rows = np.random.default_rng(seed).permutation(len(labels))
  half = len(rows) // 2
  part = lambda idx: (jnp.asarray(images[idx] / 16.0), jnp.asarray(labels[idx]))
  return part(rows[:half]), part(rows[half:])


def penalty(w, log_decay):
  return jnp.sum(jnp.exp(log_decay) * w**2)


def squared_error(w, x, y):
  return 0.5 * jnp.mean(jnp.sum((x @ w - jax.nn.one_hot(y, w.shape[1])) ** 2, axis=1))


def cross_entropy(w, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(x @ w, y).mean()


def ridge_problem(train, val):
  """Returns ``(inner, outer, w_star, log_decay, exact_hypergradient)`` for ridge."""
  inner = lambda w, ld, x, y: squared_error(w, x, y) + penalty(w, ld)
  outer = lambda w, ld, x, y: squared_error(w, x, y)

  def closed_form(log_decay):
    x, y = train
    gram = x.T @ x / x.shape[0]
    rhs = x.T @ jax.nn.one_hot(y, NUM_CLASSES) / x.shape[0]
    solve_column = lambda ld, b: jnp.linalg.solve(gram + 2 * jnp.diag(jnp.exp(ld)), b)
    return jax.vmap(solve_column, in_axes=1, out_axes=1)(log_decay, rhs)

  log_decay = jnp.asarray(np.full((_common.NUM_FEATURES, NUM_CLASSES), np.log(DECAY)))
  exact = jax.jit(jax.grad(lambda ld: outer(closed_form(ld), ld, *val)))(log_decay)
  return inner, outer, jax.jit(closed_form)(log_decay), log_decay, exact


def logistic_problem(train, val, *, newton_steps: int = 30):
  """Returns ``(inner, outer, w_star, log_decay, exact_hypergradient)`` for logistic."""
  inner = lambda w, ld, x, y: cross_entropy(w, x, y) + penalty(w, ld)
  outer = lambda w, ld, x, y: cross_entropy(w, x, y)
  log_decay = jnp.asarray(np.full((_common.NUM_FEATURES, NUM_CLASSES), np.log(DECAY)))
  shape = log_decay.shape

  @jax.jit
  def newton(w):
    flat = lambda v: inner(v.reshape(shape), log_decay, *train)
    step = lambda _, v: v - jnp.linalg.solve(jax.hessian(flat)(v), jax.grad(flat)(v))
    return jax.lax.fori_loop(0, newton_steps, step, w.ravel()).reshape(shape)

  w_star = newton(jnp.zeros(shape))
  exact = jax.jit(
    lambda w, ld: ih.hypergrad_with_info(
      inner, outer, w, ld, inner_args=train, outer_args=val, solver=ih.Direct()
    )[0]
  )(w_star, log_decay)
  return inner, outer, w_star, log_decay, exact


PROBLEMS = {"ridge": ridge_problem, "logistic": logistic_problem}
# The solvers used when none is given: the decorators' (`implicit_argmin`) and the online
# entry points' (`ih.hypergrad`, `ih.bilevel`).
DEFAULTS = {
  "implicit_argmin default CG(steps=100)": ih.CG(steps=100),
  "hypergrad default Neumann()": ih.Neumann(),
}


def largest_eigenvalue(inner, w, log_decay, train) -> float:
  """The exact largest eigenvalue of the training-loss Hessian (dense, small problems)."""
  flat = lambda v: inner(v.reshape(w.shape), log_decay, *train)
  return float(np.linalg.eigvalsh(np.asarray(jax.jit(jax.hessian(flat))(w.ravel())))[-1])


def solvers(k: int, alpha: float) -> dict:
  return {
    "Neumann(alpha=1/lambda_max)": ih.Neumann(steps=k, alpha=alpha),
    "Neumann(alpha=None)": ih.Neumann(steps=k),
    "CG": ih.CG(steps=k, tol=0.0),
    "MINRES": ih.MINRES(steps=max(k - 1, 0), tol=0.0),
    "GMRES": ih.GMRES(steps=max(k - 1, 0), tol=0.0),
    "Nystrom": ih.Nystrom(rank=max(k - 1, 1), ridge=0.01 / alpha),
    "CG+Nystrom": ih.CG(
      steps=k - math.ceil(k / 5),
      tol=0.0,
      preconditioner=ih.NystromPreconditioner(rank=max(2 * k, 1), refresh_every=10),
    ),
  }


def compare(name: str, train, val, *, ks, rounds: int) -> dict:
  inner, outer, w_star, log_decay, exact = PROBLEMS[name](train, val)
  alpha = 1.0 / largest_eigenvalue(inner, w_star, log_decay, train)

  def hypergradient(solver, w, ld, train, val):
    return ih.hypergrad_with_info(
      inner, outer, w, ld, inner_args=train, outer_args=val, solver=solver
    )[0]

  args = (w_star, log_decay, train, val)
  calls = {
    (method, k): functools.partial(jax.jit(functools.partial(hypergradient, solver)), *args)
    for k in ks
    for method, solver in solvers(k, alpha).items()
  }
  calls[("Direct", None)] = functools.partial(
    jax.jit(functools.partial(hypergradient, ih.Direct())), *args
  )
  samples, outputs = _common.time_interleaved(calls, rounds=rounds)
  exact = np.asarray(exact).ravel()
  curves = {}
  for (method, k), g in outputs.items():
    g = np.asarray(g).ravel()
    curve = curves.setdefault(method, {"k": [], "relative_error": [], "cosine": [], "seconds": []})
    curve["k"].append(k)
    curve["relative_error"].append(float(np.linalg.norm(g - exact) / np.linalg.norm(exact)))
    curve["cosine"].append(_common.cosine(g, exact))
    curve["seconds"].append(_common.median(samples[(method, k)]))
  inner_grad = jax.jit(jax.grad(inner))(w_star, log_decay, *train)
  defaults = {}
  for method, solver in DEFAULTS.items():
    g, info, _ = ih.hypergrad_with_info(
      inner, outer, w_star, log_decay, inner_args=train, outer_args=val, solver=solver
    )
    g = np.asarray(g).ravel()
    defaults[method] = {
      "relative_error": float(np.linalg.norm(g - exact) / np.linalg.norm(exact)),
      "residual": float(info.residual_norm),
      "steps": int(info.num_steps),
      "converged": bool(info.converged),
    }
  return {
    "defaults": defaults,
    "problem": name,
    "num_hyperparameters": int(log_decay.size),
    "alpha": alpha,
    "inner_gradient_norm_at_solution": float(np.linalg.norm(inner_grad)),
    "exact_hypergradient_norm": float(np.linalg.norm(exact)),
    "curves": curves,
  }


def plot(results, path) -> None:
  """Relative error and ``1 - cosine`` against K (rows 1, 3) and against wall time (rows 2, 4)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  metrics = (("relative error", "relative_error", False), ("1 - cosine", "cosine", True))
  fig, axes = plt.subplots(4, len(results), figsize=(5.5 * len(results), 15), squeeze=False)
  for col, result in enumerate(results):
    for row, (label, key, complement) in enumerate(metrics):
      by_k, by_time = axes[2 * row, col], axes[2 * row + 1, col]
      for method, curve in result["curves"].items():
        if method == "Direct":
          by_time.axvline(curve["seconds"][0] * 1e3, color="k", ls=":", label="Direct (exact)")
          continue
        values = np.asarray(curve[key])
        values = np.maximum(1.0 - values if complement else values, 1e-17)
        by_k.semilogy(curve["k"], values, marker=".", label=method)
        by_time.loglog(np.asarray(curve["seconds"]) * 1e3, values, marker=".", label=method)
      title = f"{result['problem']} ({result['num_hyperparameters']} hyperparameters)"
      by_k.set(title=title, xlabel="K (Hessian-vector products)", ylabel=label)
      by_time.set(title=title, xlabel="wall time per hypergradient (ms)", ylabel=label)
  for ax in axes.flat:
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  print(f"wrote {path}")


def main(argv=None):
  parser = _common.common_args(__doc__.splitlines()[0])
  parser.add_argument("--ks", type=int, nargs="+", default=list(K_GRID), help="values of K")
  parser.add_argument("--rounds", type=int, default=15, help="timed calls per point")
  args = parser.parse_args(argv)
  jax.config.update("jax_enable_x64", True)
  ks = [1] if args.quick else args.ks
  rounds = 1 if args.quick else args.rounds
  train, val = digits_halves()

  results = []
  for name in PROBLEMS:
    print(f"{name}...", flush=True)
    results.append(compare(name, train, val, ks=ks, rounds=rounds))
  for result in results:
    print(
      f"\n{result['problem']}: relative error / cosine to the exact hypergradient, "
      f"time per hypergradient (alpha = {result['alpha']:.3g}):"
    )
    methods = [m for m in result["curves"] if m != "Direct"]
    _common.print_table(["K", *methods], _rows(result["curves"], methods))
    print(f"Direct (exact): {_common.format_seconds(result['curves']['Direct']['seconds'][0])}")
    for method, d in result["defaults"].items():
      print(
        f"{method}: relative error {d['relative_error']:.2e}, residual {d['residual']:.2e} "
        f"after {d['steps']} steps, converged {d['converged']}"
      )
  payload = {"machine": _common.machine(), "decay": DECAY, "rounds": rounds, "results": results}
  _common.write_json(args.out, "accuracy", payload)
  plot(results, args.out / "accuracy.png")


def _rows(curves, methods):
  def cell(curve, i):
    seconds = _common.format_seconds(curve["seconds"][i])
    return f"{curve['relative_error'][i]:.2e} / {curve['cosine'][i]:.6f} / {seconds}"

  ks = curves[methods[0]]["k"]
  return [[k, *(cell(curves[m], i) for m in methods)] for i, k in enumerate(ks)]


if __name__ == "__main__":
  main()
