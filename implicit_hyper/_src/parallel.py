"""Helpers for data parallelism with `jax.pmap`."""

from collections.abc import Hashable

import jax
from jax import lax

from implicit_hyper._src.solvers._base import PyTree


def pmean_gradient(tree: PyTree, axis_name: Hashable) -> PyTree:
  """The identity on `tree`, whose gradient is averaged over the mapped axis `axis_name`.

  Under `jax.pmap`, ``jax.grad`` of a ``lax.pmean``-averaged loss gives each device the
  gradient of its own slice only. The library takes gradients and Hessian-vector products
  inside the loss, so the averaging has to be part of the loss: pass the parameters and
  hyperparameters through this function first, and every gradient, Hessian-vector
  product and mixed product is the global one, identical on every device. Not needed
  under `jax.jit` with sharded arrays or under `jax.shard_map`, which track replication.

  Args:
    tree: a pytree (e.g. ``(params, hparams)``).
    axis_name: the `jax.pmap` axis name to average over.

  Returns:
    `tree`, unchanged.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import implicit_hyper as ih
    >>> def loss(w, x):
    ...   return jnp.mean((ih.pmean_gradient(w, "i") * x) ** 2)
    >>> x = jnp.arange(1.0, 3.0)[:, None]   # device 0 holds 1, device 1 holds 2
    >>> g = jax.pmap(jax.grad(loss), axis_name="i", in_axes=(None, 0), devices=jax.devices()[:2])
    >>> g(1.0, x).tolist()   # d/dw of mean(w^2 x^2) over both devices: (2 + 8) / 2
    [5.0, 5.0]
  """

  @jax.custom_vjp
  def identity(tree: PyTree) -> PyTree:
    return tree

  identity.defvjp(lambda tree: (tree, None), lambda _, g: (lax.pmean(g, axis_name),))
  return identity(tree)
