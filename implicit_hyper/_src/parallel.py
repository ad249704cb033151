"""Data parallelism: `jax.pmap`'s averaged gradients, and `jax.shard_map`'s varying types.

Inside `jax.shard_map` with its default ``check_vma=True`` every value carries the set of
mesh axes along which it varies (``{V:d}`` in a printed type). The implicit rule must
return tangents of exactly its primal's type, and evaluates closure-converted functions,
which do not insert the casts that ordinary JAX operations insert, at points of other
types: the helpers here align the types. Without replication checking (``check_vma=False``,
and `jax.pmap`) JAX transposes every collective as if each device's input were its own, so
the gradient of a ``pmean``-averaged loss is each device's local gradient:
`check_collectives` refuses such a loss with what to write instead.
"""

from collections.abc import Callable
from collections.abc import Hashable
from typing import Any
from typing import TypeAlias

import jax
import jax.numpy as jnp
from jax import lax

# Any nesting of containers around arrays (as `solvers._base.PyTree`).
PyTree: TypeAlias = Any
# The primitives through which one device's output depends on another device's input.
_COLLECTIVES = frozenset(
  {"psum", "pmax", "pmin", "all_gather", "all_to_all", "ppermute", "reduce_scatter", "pbroadcast"}
)
_IDENTITY_NAME = "_pmean_gradient_identity"


def pmean_gradient(tree: PyTree, axis_name: Hashable) -> PyTree:
  """The identity on `tree`, whose gradient is averaged over the mapped axis `axis_name`.

  Under `jax.pmap` (and `jax.shard_map` with ``check_vma=False``), ``jax.grad`` of a
  ``lax.pmean``-averaged loss gives each device the gradient of its own slice only. The
  library takes gradients and Hessian-vector products inside the loss, so the averaging
  has to be part of the loss: pass the parameters and hyperparameters through this
  function first, and every gradient, Hessian-vector product and mixed product is the
  global one, identical on every device. Not needed under `jax.jit` with sharded arrays
  or under `jax.shard_map` with its default ``check_vma=True``, which track replication.

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

  def _pmean_gradient_identity(tree: PyTree) -> PyTree:
    return tree

  identity = jax.custom_vjp(_pmean_gradient_identity)
  identity.defvjp(lambda tree: (tree, None), lambda _, g: (lax.pmean(g, axis_name),))
  return identity(tree)


def varying_axes(x: Any) -> frozenset[Hashable]:
  """The manual mesh axes along which `x` varies (empty outside `shard_map`)."""
  aval = jax.typeof(x)
  # `aval.vma` in JAX before 0.10, `aval.mat.varying` since.
  vma: Any = getattr(aval, "vma", None)
  if vma is None:
    vma = getattr(getattr(aval, "mat", None), "varying", ())
  return frozenset(vma)


def _vary(x: Any, axes: tuple[Hashable, ...]) -> Any:
  if hasattr(lax, "pcast"):
    return lax.pcast(x, axes, to="varying")
  return lax.pvary(x, axes)  # type: ignore[attr-defined]  # JAX before 0.8.2


def union_varying(tree: PyTree) -> frozenset[Hashable]:
  """The manual mesh axes along which any leaf of `tree` varies."""
  return frozenset().union(*(varying_axes(x) for x in jax.tree.leaves(tree)))


def vary_along(tree: PyTree, axes: frozenset[Hashable]) -> PyTree:
  """`tree` with every leaf cast to vary along `axes` (a no-op outside `shard_map`).

  A solver's loop starts from constants (a step count, a flag) that do not vary, while its
  body computes them from a right-hand side that does; `jax.lax.while_loop` requires the
  carry to keep its type.
  """

  def cast(x: Any) -> Any:
    missing = tuple(sorted(axes - varying_axes(x), key=str))
    return _vary(x, missing) if missing else x

  return jax.tree.map(cast, tree)


def vary_carry(carry: PyTree, *like: PyTree) -> PyTree:
  """`carry` with every leaf varying along every axis any leaf of `carry` or `like` varies.

  For the initial carry of a solver's loop (or the outputs of the branches of a
  `jax.lax.cond`) whose body computes with a right-hand side `like` that varies across
  devices: constants (a step count, a flag, a random start) would change type.
  """
  return vary_along(carry, union_varying((carry, like)))


def vary_like(tree: PyTree, like: PyTree) -> PyTree:
  """`tree` cast, leaf by leaf, to vary along every axis its `like` leaf varies along."""
  return jax.tree.map(lambda x, y: vary_along(x, varying_axes(y)), tree, like)


def match_varying(tree: PyTree, like: PyTree) -> PyTree:
  """`tree` with the varying axes of `like`, for values known to agree along the extra ones.

  `jax.lax.custom_linear_solve` types its solution as varying along every axis that any
  array of the operator varies along (a batch split over devices), although the solution
  of a system whose operator and right-hand side are replicated is replicated. JAX has no
  cast from varying to replicated, so the extra axes are removed by a mean over them: one
  all-reduce of a vector, exact up to the last bit.
  """

  def cast(x: Any, y: Any) -> Any:
    extra = tuple(sorted(varying_axes(x) - varying_axes(y), key=str))
    return lax.pmean(x, extra) if extra else x

  return vary_like(jax.tree.map(cast, tree, like), like)


def check_collectives(what: str, fn: Callable[..., Any], *args: Any) -> None:
  """Refuses `fn` (named `what`) when it reduces over a mapped axis that JAX does not check.

  Without replication checking JAX transposes ``psum`` to ``psum``, as if each device's
  copy of a replicated input were an input of its own: ``jax.grad`` of a loss averaged
  with ``lax.pmean`` is then each device's local gradient. `fn` is traced once
  (`jax.make_jaxpr`), only inside such a context.
  """
  axes = tuple(jax.sharding.get_abstract_mesh().manual_axes)
  if not axes or varying_axes(_vary(jnp.zeros(()), axes)):
    return
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  reduced = sorted(_collective_axes(jaxpr) & set(axes), key=str)
  if reduced and not _uses_pmean_gradient(jaxpr):
    axis = reduced[0]
    raise ValueError(
      f"{what} reduces over the mapped axis {axis!r} (a `lax.pmean` or "
      "`lax.psum`) where JAX does not track replication (`jax.shard_map(..., "
      "check_vma=False)` or `jax.pmap`). There `jax.grad` of the loss is each device's "
      "local gradient, not the gradient of the averaged loss, so every Hessian-vector "
      "product and the hypergradient would be wrong and differ between devices. Write "
      "`jax.shard_map` with its default `check_vma=True` (parameters and hyperparameters "
      "in `P()`), or keep the loss per device and pass its parameters and hyperparameters "
      f"through `ih.pmean_gradient((params, hparams), {axis!r})`."
    )


def _subjaxprs(params: dict[str, Any]) -> list[Any]:
  found = []
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      inner = getattr(item, "jaxpr", item)
      if hasattr(inner, "eqns"):
        found.append(inner)
  return found


def _eqns(jaxpr: Any) -> list[Any]:
  eqns = list(jaxpr.eqns)
  for eqn in jaxpr.eqns:
    for inner in _subjaxprs(eqn.params):
      eqns.extend(_eqns(inner))
  return eqns


def _collective_axes(jaxpr: Any) -> set[Hashable]:
  axes: set[Hashable] = set()
  for eqn in _eqns(jaxpr):
    if eqn.primitive.name.removesuffix("_invariant") in _COLLECTIVES:
      named = eqn.params.get("axes", eqn.params.get("axis_name", ()))
      axes.update(named if isinstance(named, (tuple, list, frozenset)) else (named,))
  return axes


def _uses_pmean_gradient(jaxpr: Any) -> bool:
  for eqn in _eqns(jaxpr):
    inner = eqn.params.get("call_jaxpr")
    debug = getattr(getattr(inner, "jaxpr", None), "debug_info", None)
    if getattr(debug, "func_name", None) == _IDENTITY_NAME:
      return True
  return False
