"""Leaves that are not arrays (an equinox Module's function fields): carried, not trained.

An `equinox.Module` flattens every field that is not marked static, so a model or a set of
hyperparameters with ``activation: Callable = jax.nn.relu`` has a function among its
leaves. equinox users split such trees with ``eqx.partition(tree, eqx.is_inexact_array)``
and put them back with ``eqx.combine``; the same is done here without importing equinox:
the arrays and numbers are trained and differentiated, the other leaves are carried
unchanged, as static values of the compiled step (`filter_jit`, like ``eqx.filter_jit``).
"""

import functools
import numbers
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from implicit_hyper._src import differentiable
from implicit_hyper._src.methods._common import Bilevel
from implicit_hyper._src.methods._common import BilevelState
from implicit_hyper._src.solvers._base import PyTree


def is_static(leaf: object) -> bool:
  """Whether a leaf is neither an array nor a number (a function, a string, an object)."""
  return not isinstance(leaf, jax.Array | np.ndarray | np.generic | numbers.Number)


def has_static(tree: PyTree) -> bool:
  """Whether any leaf of `tree` is static."""
  return any(is_static(leaf) for leaf in jax.tree.leaves(tree))


def partition(tree: PyTree) -> tuple[PyTree, PyTree]:
  """``(arrays, static)``: two trees like `tree`, with None where the other has a leaf."""
  return differentiable.partition_by(tree, lambda x: not is_static(x))


combine = differentiable.combine  # the inverse of `partition`


def on_arrays(fn: Callable[[PyTree], PyTree]) -> Callable[[PyTree], PyTree]:
  """``tree -> combine(fn(arrays), static)``: `fn` sees the array leaves only."""

  def apply(tree: PyTree) -> PyTree:
    if not has_static(tree):
      return fn(tree)
    arrays, static = partition(tree)
    return combine(fn(arrays), static)

  return apply


def carries_static(factory: Callable[..., Bilevel]) -> Callable[..., Bilevel]:
  """`factory` whose `init` and `step` also take weights and hparams with static leaves.

  The method runs on their arrays (`partition`); its losses get the static leaves back
  (`combine`), and the state holds them unchanged. A method built by
  ``factory(inner_loss, outer_loss, ...)`` is rebuilt around the bound losses once per
  static signature, when its `step` is traced.
  """

  @functools.wraps(factory)
  def make(
    inner_loss: Callable[..., Any], outer_loss: Callable[..., Any], *args: Any, **kw: Any
  ) -> Bilevel:
    loop = factory(inner_loss, outer_loss, *args, **kw)

    def on_arrays_of(params: PyTree, hparams: PyTree) -> tuple[Bilevel, PyTree, PyTree]:
      """The method on the arrays, and the static parts of `params` and `hparams`."""
      p_static, h_static = partition(params)[1], partition(hparams)[1]
      bind = lambda loss: lambda w, lam, *a: loss(combine(w, p_static), combine(lam, h_static), *a)
      return factory(bind(inner_loss), bind(outer_loss), *args, **kw), p_static, h_static

    def init(params: PyTree, hparams: PyTree) -> BilevelState:
      if not has_static((params, hparams)):
        return loop.init(params, hparams)
      method, p_static, h_static = on_arrays_of(params, hparams)
      state = method.init(partition(params)[0], partition(hparams)[0])
      return _restore(state, p_static, h_static)

    def step(state: BilevelState, inner_args: Any, outer_args: Any) -> tuple[BilevelState, Any]:
      if not has_static((state.params, state.hparams)):
        return loop.step(state, inner_args, outer_args)
      method, p_static, h_static = on_arrays_of(state.params, state.hparams)
      arrays = state._replace(
        params=partition(state.params)[0], hparams=partition(state.hparams)[0]
      )
      new_state, metrics = method.step(arrays, inner_args, outer_args)
      return _restore(new_state, p_static, h_static), metrics

    return loop._replace(init=init, step=step, constrain=on_arrays(loop.constrain))

  return make


def _restore(state: BilevelState, params_static: PyTree, hparams_static: PyTree) -> BilevelState:
  """`state` with the static leaves of the weights and hyperparameters put back."""
  return state._replace(
    params=combine(state.params, params_static), hparams=combine(state.hparams, hparams_static)
  )


def _split(tree: PyTree) -> tuple[list[Any], tuple[Any, ...]]:
  """The leaves of `tree` with None for the static ones, and its hashable static signature."""
  leaves, treedef = jax.tree.flatten(tree)
  static = tuple((i, x) for i, x in enumerate(leaves) if is_static(x))
  return [None if is_static(x) else x for x in leaves], (treedef, static)


def _merge(leaves: list[Any], signature: tuple[Any, ...]) -> PyTree:
  """The inverse of `_split`."""
  treedef, static = signature
  leaves = list(leaves)
  for i, x in static:
    leaves[i] = x
  return jax.tree.unflatten(treedef, leaves)


def filter_jit(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`jax.jit` of `fn` over the array leaves of its arguments; static leaves are constants.

  As ``eqx.filter_jit``: a new static value (another function) compiles anew, and the
  static leaves of the outputs come back as they were when `fn` was traced.
  """
  outputs: dict[tuple[Any, ...], tuple[Any, ...]] = {}

  @functools.partial(jax.jit, static_argnums=1)
  def compiled(leaves: list[Any], signature: tuple[Any, ...]) -> list[Any]:
    out_leaves, outputs[signature] = _split(fn(*_merge(leaves, signature)))
    return out_leaves

  @functools.wraps(fn)
  def call(*args: Any) -> Any:
    leaves, signature = _split(args)
    out_leaves = compiled(leaves, signature)
    return _merge(out_leaves, outputs[signature])

  return call
