"""Pytree vectors for the Krylov and sketching solvers: arithmetic that keeps each leaf's dtype.

`optax.tree_utils.tree_add_scale(x, s, y)` computes ``x + s * y`` leaf by leaf, so a
float64 scalar turns a float32 leaf into float64 and a `lax.while_loop` carry changes
type. Here scalars are computed in the widest dtype of the tree and every result is cast
back to the dtype of its leaf. A *stack* is a pytree whose leaves carry a leading axis
of length m: m vectors, such as a Lanczos basis, in the layout (and sharding) of the
parameters.
"""

from typing import Any
from typing import TypeAlias

import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from jax.flatten_util import ravel_pytree
from jax.typing import ArrayLike
from jax.typing import DTypeLike

# Any nesting of containers around arrays: JAX has no type for pytrees (as `_base.PyTree`).
PyTree: TypeAlias = Any


def add_scaled(x: PyTree, scalar: ArrayLike, y: PyTree) -> PyTree:
  """``x + scalar * y``, each leaf in the dtype of `x`."""
  return jax.tree.map(lambda a, b: (a + scalar * b).astype(a.dtype), x, y)


def scaled(scalar: ArrayLike, x: PyTree) -> PyTree:
  """``scalar * x``, each leaf in its own dtype."""
  return jax.tree.map(lambda a: (scalar * a).astype(a.dtype), x)


def like_tree(x: PyTree, like: PyTree) -> PyTree:
  """`x` with each leaf cast to the dtype of the matching leaf of `like`."""
  return jax.tree.map(lambda a, b: a.astype(b.dtype), x, like)


def norm(x: PyTree) -> jax.Array:
  """The Euclidean norm of a pytree, accumulated in its widest dtype."""
  return jnp.sqrt(otu.tree_vdot(x, x))


def random_unit(like: PyTree, key: jax.Array) -> PyTree:
  """A Gaussian vector shaped like `like`, of unit norm.

  One flat draw: a draw per leaf (`otu.tree_random_like`) is slow to compile for large trees.
  """
  flat, unravel = ravel_pytree(like)
  v = like_tree(unravel(jax.random.normal(key, flat.shape, flat.dtype)), like)
  return scaled(1.0 / norm(v), v)


def stack_zeros(like: PyTree, size: int) -> PyTree:
  """A stack of `size` zero vectors shaped like `like`."""
  return jax.tree.map(lambda a: jnp.zeros((size, *jnp.shape(a)), jnp.result_type(a)), like)


def stack_set(stack: PyTree, i: int | jax.Array, x: PyTree) -> PyTree:
  """`stack` with its vector `i` replaced by `x`."""
  return jax.tree.map(lambda s, a: s.at[i].set(a.astype(s.dtype)), stack, x)


def stack_dots(stack: PyTree, x: PyTree, dtype: DTypeLike) -> jax.Array:
  """``[<s_0, x>, ..., <s_{m-1}, x>]`` in `dtype`."""
  dots = jax.tree.map(
    lambda s, a: jnp.tensordot(s, a.astype(s.dtype), axes=a.ndim).astype(dtype), stack, x
  )
  return sum(jax.tree.leaves(dots), jnp.zeros((), dtype))


def stack_combine(stack: PyTree, coefficients: jax.Array) -> PyTree:
  """``sum_i coefficients[i] s_i``, each leaf in the dtype of the stack."""
  return jax.tree.map(
    lambda s: jnp.tensordot(coefficients.astype(s.dtype), s, axes=1).astype(s.dtype), stack
  )
