"""Checks on user input, made at trace time so errors name the argument at fault."""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def check_float_tree(call: str, name: str, tree: Any) -> None:
  """Raises `TypeError` unless every leaf of `tree` is a real floating-point array."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"`{call}`: `{name}` must hold real floating-point arrays to be differentiated, "
        f"but leaf {name}{jax.tree_util.keystr(path)} has dtype {dtype}. "
        + _COMPLEX_HINT
        * jnp.issubdtype(dtype, jnp.complexfloating)
        + "Cast it, e.g. `jnp.asarray(x, jnp.float32)`, or pass integer data (labels) in "
        "`*args`."
      )


def check_real_tree(call: str, name: str, tree: Any) -> None:
  """Raises `TypeError` when a leaf of `tree` is complex (not supported: see the hint)."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if jnp.issubdtype(jnp.result_type(leaf), jnp.complexfloating):
      raise TypeError(
        f"`{call}`: leaf {name}{jax.tree_util.keystr(path)} is complex "
        f"({jnp.result_type(leaf)}). " + _COMPLEX_HINT
      )


_COMPLEX_HINT = (
  "Complex parameters are not supported: the solvers assume a real inner product. Split "
  "them into real and imaginary parts (a pytree of two real arrays). "
)


def check_same_structure(call: str, name: str, got: Any, expected: Any, expected_name: str) -> None:
  """Raises `ValueError` unless `got` has the tree structure, shapes and dtypes of `expected`."""
  got_struct: Any
  expected_struct: Any
  got_struct, expected_struct = jax.tree.structure(got), jax.tree.structure(expected)
  if got_struct != expected_struct:
    raise ValueError(
      f"`{call}`: {name} must have the same pytree structure as {expected_name}; got "
      f"{got_struct}, expected {expected_struct}."
    )
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(expected), strict=True
  ):
    if jnp.shape(a) != jnp.shape(b) or jnp.result_type(a) != jnp.result_type(b):
      raise ValueError(
        f"`{call}`: leaf {jax.tree_util.keystr(path)} of {name} has shape {jnp.shape(a)} and "
        f"dtype {jnp.result_type(a)}, but {expected_name} has shape {jnp.shape(b)} and "
        f"dtype {jnp.result_type(b)}."
      )


def check_scalar_loss(
  call: str, name: str, loss_fn: Callable[..., Any], *example_args: Any, **example_kwargs: Any
) -> None:
  """Raises `ValueError` unless `loss_fn(*example_args, **example_kwargs)` is a real scalar."""
  out = jax.eval_shape(functools.partial(loss_fn, **example_kwargs), *example_args)
  if not (hasattr(out, "shape") and out.shape == () and jnp.issubdtype(out.dtype, jnp.floating)):
    raise ValueError(
      f"`{call}`: `{name}` must return a real scalar, got "
      f"{getattr(out, 'shape', type(out))} {getattr(out, 'dtype', '')}.".rstrip()
      + " "
      "Reduce it, e.g. with `jnp.mean`."
    )


def check_args_tuple(call: str, name: str, args: object) -> None:
  """Raises `TypeError` unless `args` is a tuple or list (the extra arguments of a loss)."""
  if not isinstance(args, (tuple, list)):
    raise TypeError(
      f"`{call}({name}=...)` must be a tuple of the loss's extra arguments, got "
      f"{type(args).__name__}. For a single array `x`, pass `{name}=(x,)`."
    )
