"""Which leaves of the parameters are solved for: the floating-point ones; the rest are constants.

A training state often carries leaves that no derivative reaches (a PRNG key, typed or
``uint32``; a step counter). The implicit function theorem solves only for the floating
leaves, as `eqx.partition` does with `eqx.is_inexact_array`; the others pass through.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from implicit_hyper._src.solvers._base import PyTree


def is_differentiable(x: object) -> bool:
  """Whether a leaf is a real or complex floating-point array or Python float."""
  if isinstance(x, (bool, int)) or not isinstance(x, (jax.Array, np.ndarray, np.generic, float)):
    return False
  return bool(jnp.issubdtype(jnp.result_type(x), jnp.inexact))


def partition_by(tree: PyTree, keep: Callable[[object], bool]) -> tuple[PyTree, PyTree]:
  """``(kept, other)``: two trees like `tree`, with None where the other has a leaf."""
  kept = jax.tree.map(lambda x: x if keep(x) else None, tree)
  other = jax.tree.map(lambda x: None if keep(x) else x, tree)
  return kept, other


def partition(tree: PyTree) -> tuple[PyTree, PyTree]:
  """``(floating, constant)``: the floating-point leaves of `tree` and the others."""
  return partition_by(tree, is_differentiable)


def combine(floating: PyTree, constant: PyTree) -> PyTree:
  """The inverse of `partition`."""
  return jax.tree.map(
    lambda f, c: c if f is None else f, floating, constant, is_leaf=lambda x: x is None
  )


def like_floating(tree: PyTree, params: PyTree) -> PyTree:
  """The leaves of `tree` (shaped like `params`) where `params` has floating leaves."""
  return jax.tree.map(lambda t, p: t if is_differentiable(p) else None, tree, params)


def zeros_like_floating(params: PyTree) -> PyTree:
  """Zeros like the floating part of `params` (None elsewhere)."""
  return jax.tree.map(jnp.zeros_like, partition(params)[0])


def has_constants(tree: PyTree) -> bool:
  """Whether any leaf of `tree` is not floating point."""
  return not all(is_differentiable(x) for x in jax.tree.leaves(tree))
