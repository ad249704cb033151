"""Checks on user input, made at trace time so errors name the argument at fault."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_float_tree(call: str, name: str, tree: Any) -> None:
  """Raises `TypeError` unless every leaf of `tree` is a real floating-point array.

  Functions (the non-static callable fields of an `equinox.Module`) are skipped: as with
  `eqx.is_inexact_array`, they are not differentiated.
  """
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if is_function(leaf):
      continue
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


def is_function(leaf: Any) -> bool:
  """Whether a leaf is a function (to be bound, not differentiated), not an array."""
  return callable(leaf) and not isinstance(leaf, jax.Array | np.ndarray | np.generic)


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


def eval_shape(
  call: str, name: str, fn: Callable[..., Any], *example_args: Any, **example_kwargs: Any
) -> Any:
  """`jax.eval_shape` of a user's function; a failure is re-raised naming the arguments' shapes.

  A hyperparameter of the wrong shape (5 decays for 10 weights) or a Python list where
  the loss expects an array fails inside JAX; the message then names `hparams`.
  """
  leaves, treedef = jax.tree.flatten(example_args)
  functions = [x if is_function(x) else None for x in leaves]

  def of_arrays(*arrays: Any) -> Any:
    merged = [f if f is not None else a for f, a in zip(functions, arrays, strict=True)]
    return fn(*jax.tree.unflatten(treedef, merged), **example_kwargs)

  try:
    # Function leaves (an equinox Module's callables) are bound, not traced.
    return jax.eval_shape(
      of_arrays, *[None if f is not None else x for f, x in zip(functions, leaves, strict=True)]
    )
  except (TypeError, ValueError) as error:
    params, hparams = (example_args + (None, None))[:2]
    hint = ""
    if any(isinstance(t, (list, tuple)) for t in (hparams, params)):
      hint = (
        " `hparams` (or `params`) is a Python list or tuple, a pytree of separate scalars:"
        " pass `jnp.asarray(...)` where the function expects one array."
      )
    raise type(error)(
      f"`{call}`: `{name}(params, hparams, ...)` fails on the given arguments, with params "
      f"shaped {_shapes(params)} and hparams shaped {_shapes(hparams)}: check that `hparams` "
      f"has the shapes `{name}` expects.{hint} The error: {error}"
    ) from error


def _shapes(tree: Any) -> Any:
  def describe(x: Any) -> str:
    try:
      return str(jax.typeof(x).str_short())
    except TypeError:
      return type(x).__name__

  return jax.tree.map(describe, tree)


def loss_value(
  call: str, name: str, loss_fn: Callable[..., Any], has_aux: bool
) -> Callable[..., Any]:
  """`loss_fn`, or its first output when it returns ``(loss, aux)`` (``loss_has_aux=True``)."""
  if not has_aux:
    return loss_fn

  def value(*args: Any, **kwargs: Any) -> Any:
    out = loss_fn(*args, **kwargs)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
      raise TypeError(
        f"`{call}(loss_has_aux=True)`: `{name}` must return a pair `(loss, aux)`, got "
        f"{type(out).__name__}."
      )
    return out[0]

  return value


def check_scalar_loss(
  call: str, name: str, loss_fn: Callable[..., Any], *example_args: Any, **example_kwargs: Any
) -> None:
  """Raises `ValueError` unless `loss_fn(*example_args, **example_kwargs)` is a real scalar."""
  out = eval_shape(call, name, loss_fn, *example_args, **example_kwargs)
  if not (hasattr(out, "shape") and out.shape == () and jnp.issubdtype(out.dtype, jnp.floating)):
    aux_hint = (
      " For a loss that returns `(loss, aux)`, pass `loss_has_aux=True`."
      if isinstance(out, (tuple, list))
      else ""
    )
    raise ValueError(
      f"`{call}`: `{name}` must return a real scalar, got "
      f"{getattr(out, 'shape', type(out))} {getattr(out, 'dtype', '')}.".rstrip()
      + " Reduce it, e.g. with `jnp.mean`."
      + aux_hint
    )


def check_args_tuple(call: str, name: str, args: object) -> None:
  """Raises `TypeError` unless `args` is a tuple or list (the extra arguments of a loss)."""
  if not isinstance(args, (tuple, list)):
    raise TypeError(
      f"`{call}({name}=...)` must be a tuple of the loss's extra arguments, got "
      f"{type(args).__name__}. For a single array `x`, pass `{name}=(x,)`."
    )
