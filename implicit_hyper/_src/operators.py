"""Linear operators of the implicit function theorem, as matrix-free products.

For an optimality condition ``F(params, hparams, *args) = 0`` (for an argmin,
``F = grad_params L``) the theorem needs ``A = dF/dparams`` and ``B = dF/d(hparams, args)``:

  d params* / d hparams = -A^{-1} B.

Nothing here knows about solvers; the products are handed to one as `matvec`.
"""

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax

from implicit_hyper._src import parallel
from implicit_hyper._src.solvers._base import Matvec
from implicit_hyper._src.solvers._base import PyTree


def hessian_vector_product(
  loss_fn: Callable[..., Any], params: PyTree, hparams: PyTree, args: Sequence[Any]
) -> Matvec:
  """Returns ``v -> d^2 L / d params^2 (params, hparams, *args) @ v``.

  Forward-over-reverse (`jax.jvp` of `jax.grad`): one product costs about two gradient
  evaluations and no memory beyond one backward pass. The Hessian is never formed.
  """
  grad_fn = jax.grad(loss_fn)

  def matvec(v: PyTree) -> PyTree:
    v = parallel.match_varying(v, params)  # a tangent has its primal's type (`shard_map`)
    return jax.jvp(lambda p: grad_fn(p, hparams, *args), (params,), (v,))[1]

  return matvec


def jacobian_product(
  optimality_fn: Callable[..., PyTree], params: PyTree, hparams: PyTree, args: Sequence[Any]
) -> Matvec:
  """Returns ``v -> dF/d params (params, hparams, *args) @ v`` for a condition F.

  For ``F = grad_params L`` this is `hessian_vector_product`, forward-over-reverse.
  """

  def matvec(v: PyTree) -> PyTree:
    v = parallel.match_varying(v, params)
    return jax.jvp(lambda p: optimality_fn(p, hparams, *args), (params,), (v,))[1]

  return matvec


def mixed_vjp(
  optimality_fn: Callable[..., PyTree], params: PyTree, hparams: PyTree, args: Sequence[Any]
) -> Callable[[PyTree], tuple[PyTree, tuple[Any, ...]]]:
  """Returns ``u -> ((dF/d hparams)^T u, (dF/d args)^T u)`` at fixed `params`.

  For ``F = grad_params L`` this is the mixed second derivative
  ``d^2 L / d hparams d params`` applied to u. Integer leaves of `args` (class labels)
  get `jax.dtypes.float0` cotangents, as JAX expects.
  """
  _, vjp = jax.vjp(lambda h, a: optimality_fn(params, h, *a), hparams, tuple(args))
  return vjp


def hparams_vjp(
  optimality_fn: Callable[..., PyTree], params: PyTree, hparams: PyTree, args: Sequence[Any]
) -> Callable[[PyTree], PyTree]:
  """Returns ``u -> (dF/d hparams)^T u`` only, for when `args` need no cotangent."""
  _, vjp = jax.vjp(lambda h: optimality_fn(params, h, *args), hparams)
  return lambda u: vjp(u)[0]
