"""Linear operators of the implicit function theorem, as matrix-free products.

For an optimality condition ``F(params, hparams, *args) = 0`` (for an argmin,
``F = grad_params L``) the theorem needs ``A = dF/dparams`` and ``B = dF/d(hparams, args)``:

  d params* / d hparams = -A^{-1} B.

Nothing here knows about solvers; the products are handed to one as `matvec`.
"""

import jax


def hessian_vector_product(loss_fn, params, hparams, args):
  """Returns ``v -> d^2 L / d params^2 (params, hparams, *args) @ v``.

  Forward-over-reverse (`jax.jvp` of `jax.grad`): one product costs about two gradient
  evaluations and no memory beyond one backward pass. The Hessian is never formed.
  """
  grad_fn = jax.grad(loss_fn)

  def matvec(v):
    return jax.jvp(lambda p: grad_fn(p, hparams, *args), (params,), (v,))[1]

  return matvec


def jacobian_product(optimality_fn, params, hparams, args):
  """Returns ``v -> dF/d params (params, hparams, *args) @ v`` for a condition F.

  For ``F = grad_params L`` this is `hessian_vector_product`, forward-over-reverse.
  """

  def matvec(v):
    return jax.jvp(lambda p: optimality_fn(p, hparams, *args), (params,), (v,))[1]

  return matvec


def mixed_vjp(optimality_fn, params, hparams, args):
  """Returns ``u -> ((dF/d hparams)^T u, (dF/d args)^T u)`` at fixed `params`.

  For ``F = grad_params L`` this is the mixed second derivative
  ``d^2 L / d hparams d params`` applied to u. Integer leaves of `args` (class labels)
  get `jax.dtypes.float0` cotangents, as JAX expects.
  """
  _, vjp = jax.vjp(lambda h, a: optimality_fn(params, h, *a), hparams, tuple(args))
  return vjp


def hparams_vjp(optimality_fn, params, hparams, args):
  """Returns ``u -> (dF/d hparams)^T u`` only, for when `args` need no cotangent."""
  _, vjp = jax.vjp(lambda h: optimality_fn(params, h, *args), hparams)
  return lambda u: vjp(u)[0]
