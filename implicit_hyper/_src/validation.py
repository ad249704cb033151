"""Checks on user input, made at trace time so errors name the argument at fault."""

import jax
import jax.numpy as jnp


def check_float_tree(call: str, name: str, tree) -> None:
  """Raises `TypeError` unless every leaf of `tree` is a floating-point array."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
        f"`{call}`: `{name}` must hold floating-point arrays to be differentiated, but "
        f"leaf {name}{jax.tree_util.keystr(path)} has dtype {dtype}. Cast it, e.g. "
        f"`jnp.asarray(x, jnp.float32)`, or pass integer data (labels) in `*args`."
      )


def check_same_structure(call: str, name: str, got, expected, expected_name: str) -> None:
  """Raises `ValueError` unless `got` has the tree structure, shapes and dtypes of `expected`."""
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


def check_scalar_loss(call: str, name: str, loss_fn, *example_args) -> None:
  """Raises `ValueError` unless `loss_fn(*example_args)` returns a real scalar."""
  out = jax.eval_shape(loss_fn, *example_args)
  if not (hasattr(out, "shape") and out.shape == () and jnp.issubdtype(out.dtype, jnp.floating)):
    raise ValueError(
      f"`{call}`: `{name}` must return a real scalar, got "
      f"{getattr(out, 'shape', type(out))} {getattr(out, 'dtype', '')}.".rstrip()
      + " "
      "Reduce it, e.g. with `jnp.mean`."
    )


def check_no_kwargs(call: str, kwargs) -> None:
  """Raises `TypeError` for keyword arguments, which the custom VJP cannot route."""
  if kwargs:
    raise TypeError(
      f"`{call}`: keyword arguments {sorted(kwargs)} cannot be routed through the implicit "
      "gradient; pass them positionally after `hparams` (arrays), or bind static settings "
      "with `functools.partial` before decorating."
    )


def check_solver(call: str, solver, *, symmetric: bool) -> None:
  """Raises when `solver` is not a linear solver, or needs a symmetry the operator lacks."""
  if not callable(getattr(solver, "solve", None)):
    raise TypeError(
      f"`{call}(solver=...)` must have a `solve(matvec, b, init=None)` method, such as "
      f"`ih.Neumann()`, got {solver!r}."
    )
  if not symmetric and getattr(solver, "requires_symmetric", False):
    raise ValueError(
      f"`{call}(solver=...)`: {solver!r} needs a symmetric operator, but the Jacobian of a "
      "general optimality condition need not be symmetric. Use `ih.BiCGStab()`, "
      "`ih.NormalCG()`, `ih.Direct()` or `ih.Neumann(alpha=...)`, or pass "
      "`symmetric=True` if dF/dparams is symmetric."
    )
