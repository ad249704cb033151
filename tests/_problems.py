"""Test problems with closed-form solutions and hypergradients, shared by the test files."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import implicit_hyper as ih


class Ridge:
  """Linear regression with one log weight decay per feature.

  L_T(w, lam) = ||X w - y||^2 / (2n) + sum_i exp(lam_i) w_i^2 / 2,
  L_V(w) = ||X_v w - y_v||^2 / (2m).
  The optimum is w* = H^{-1} X^T y / n with H = X^T X / n + diag(exp(lam)), and by the
  implicit function theorem dL_V/dlam = -(exp(lam) * w*) * (H^{-1} grad_w L_V(w*)).
  """

  def __init__(self, n=40, m=30, d=6, seed=0):
    rng = np.random.default_rng(seed)
    self.x = jnp.asarray(rng.normal(size=(n, d)))
    self.y = jnp.asarray(rng.normal(size=n))
    self.x_val = jnp.asarray(rng.normal(size=(m, d)))
    self.y_val = jnp.asarray(rng.normal(size=m))
    self.lam = jnp.asarray(rng.normal(scale=0.5, size=d) - 1.0)
    self.d = d

  @staticmethod
  def inner_loss(w, lam, x, y):
    return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * jnp.sum(jnp.exp(lam) * w**2)

  @staticmethod
  def outer_loss(w, lam, x_val, y_val):
    del lam
    return 0.5 * jnp.mean((x_val @ w - y_val) ** 2)

  def hessian(self, lam):
    return self.x.T @ self.x / self.x.shape[0] + jnp.diag(jnp.exp(lam))

  def argmin(self, lam, x=None, y=None):
    x = self.x if x is None else x
    y = self.y if y is None else y
    h = x.T @ x / x.shape[0] + jnp.diag(jnp.exp(lam))
    return jnp.linalg.solve(h, x.T @ y / x.shape[0])

  def objective(self, lam):
    """The bilevel objective L_V(w*(lam))."""
    return self.outer_loss(self.argmin(lam), lam, self.x_val, self.y_val)

  def exact_hypergrad(self, lam):
    w = self.argmin(lam)
    g = self.x_val.T @ (self.x_val @ w - self.y_val) / self.x_val.shape[0]
    return -(jnp.exp(lam) * w) * jnp.linalg.solve(self.hessian(lam), g)


# `ih.hypergrad` and `ih.hypergrad_with_info` jit-compiled with the losses static; a solver
# is a pytree, so it is an ordinary argument (a new `alpha` does not recompile).
jit_hypergrad = jax.jit(ih.hypergrad, static_argnums=(0, 1))
jit_hypergrad_with_info = jax.jit(ih.hypergrad_with_info, static_argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=0, static_argnames="steps")
def newton_argmin(loss, w0, hparams, *args, steps=12):
  """Minimises a smooth strongly convex loss to machine precision by Newton's method."""
  flat, unravel = jax.flatten_util.ravel_pytree(w0)

  def flat_loss(v):
    return loss(unravel(v), hparams, *args)

  def step(_, v):
    return v - jnp.linalg.solve(jax.hessian(flat_loss)(v), jax.grad(flat_loss)(v))

  return unravel(jax.lax.fori_loop(0, steps, step, flat))


def relative_error(a, b):
  a, b = jax.flatten_util.ravel_pytree(a)[0], jax.flatten_util.ravel_pytree(b)[0]
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def cosine(a, b):
  a, b = jax.flatten_util.ravel_pytree(a)[0], jax.flatten_util.ravel_pytree(b)[0]
  return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def digits_logistic(num_samples=300, seed=0):
  """A multinomial logistic regression on sklearn's digits with one L2 weight per feature."""
  from sklearn.datasets import load_digits

  data = load_digits()
  rng = np.random.default_rng(seed)
  idx = rng.permutation(len(data.target))
  x = jnp.asarray(data.data[idx] / 16.0)
  y = jnp.asarray(data.target[idx], jnp.int32)
  tr, va = slice(0, num_samples), slice(num_samples, 2 * num_samples)

  def outer_loss(w, log_decay, x, y):
    del log_decay
    logits = x @ w["kernel"] + w["bias"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

  def inner_loss(w, log_decay, x, y):
    # The softmax is invariant to a shift of all logits: a small fixed decay on the bias
    # keeps the Hessian positive definite.
    decay = jnp.sum(jnp.exp(log_decay)[:, None] * w["kernel"] ** 2) + 1e-2 * jnp.sum(w["bias"] ** 2)
    return outer_loss(w, log_decay, x, y) + 0.5 * decay

  w0 = {"kernel": jnp.zeros((64, 10)), "bias": jnp.zeros(10)}
  return inner_loss, outer_loss, w0, (x[tr], y[tr]), (x[va], y[va])


def cross_entropy(weights, x, labels):
  """Mean softmax cross-entropy of a linear classifier without bias."""
  logits = x @ weights
  true_logit = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  return jnp.mean(jax.nn.logsumexp(logits, axis=1) - true_logit)


def decayed_cross_entropy(weights, log_decay, x, labels):
  """Cross-entropy plus one weight decay per weight, ``exp(log_decay)``: a training loss."""
  return cross_entropy(weights, x, labels) + 0.5 * jnp.sum(jnp.exp(log_decay) * weights**2)


def validation_cross_entropy(weights, log_decay, x, labels):
  del log_decay
  return cross_entropy(weights, x, labels)


def softmax_problem(rows, features, classes, seed=0):
  """Weights, log decays, and a training and a validation batch (float64 numpy)."""
  rng = np.random.default_rng(seed)
  weights = 0.1 * rng.normal(size=(features, classes))
  log_decay = rng.normal(size=(features, classes)) - 2.0
  train = rng.normal(size=(rows, features)), rng.integers(0, classes, rows)
  val = rng.normal(size=(rows, features)), rng.integers(0, classes, rows)
  return weights, log_decay, train, val
