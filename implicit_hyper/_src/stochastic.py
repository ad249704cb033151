"""Single-loop stochastic bilevel methods (SOBA, AmIGO) as configurations of `bilevel`.

Both keep three variables moving together: the weights, the adjoint ``u ~ H^{-1} grad
L_V`` and the hyperparameters. In `bilevel` the adjoint is the warm-started state of an
`ih.Richardson` solver, so these methods reuse its state, checkpoints, divergence guard
and `ih.fit` unchanged. Updates are taken in turn (weights, then adjoint and
hyperparameters at the new weights), the alternating form of the papers' updates.
"""

from collections.abc import Callable
from typing import Any

import jax
import optax

from implicit_hyper._src.bilevel import Bilevel
from implicit_hyper._src.bilevel import bilevel
from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers.richardson import Richardson


def soba(
  inner_loss: Callable[..., Any],
  outer_loss: Callable[..., Any],
  *,
  inner_lr: float | jax.Array,
  outer_lr: float | jax.Array,
  adjoint_lr: float | jax.Array | None = None,
  hparam_transform: Any = None,
) -> Bilevel:
  r"""SOBA (Dagreou, Ablin, Vaiter & Moreau, NeurIPS 2022): one step of each per iteration.

  With minibatch estimates at every iteration,

  .. math::
    \theta \leftarrow \theta - \rho \nabla_\theta L_T, \quad
    u \leftarrow u - \rho (H u - \nabla_\theta L_V), \quad
    \lambda \leftarrow \lambda - \gamma (\nabla_\lambda L_V
      - \nabla^2_{\lambda\theta} L_T\, u),

  i.e. `bilevel` with one SGD step on the weights, ``Richardson(step_size=rho, steps=1)``
  on the adjoint and SGD on the hyperparameters. (The paper's ``v`` is ``-u``.)

  Args:
    inner_loss: ``inner_loss(params, hparams, *args)`` -> scalar training loss.
    outer_loss: ``outer_loss(params, hparams, *args)`` -> scalar validation loss.
    inner_lr: rho, the weights' step.
    outer_lr: gamma, the hyperparameters' step.
    adjoint_lr: the adjoint's step (rho when None).
    hparam_transform: as in `bilevel`.

  Returns:
    A `Bilevel` whose `step` takes ``inner_args`` with a leading axis of 1.

  References:
    https://arxiv.org/abs/2201.13409
  """
  for name, value in (("inner_lr", inner_lr), ("outer_lr", outer_lr)):
    _base.check_nonnegative("soba", name, value)
  adjoint_lr = inner_lr if adjoint_lr is None else adjoint_lr
  loop = bilevel(
    inner_loss,
    outer_loss,
    optax.sgd(inner_lr),
    optax.sgd(outer_lr),
    inner_steps=1,
    solver=Richardson(step_size=adjoint_lr, steps=1),
    hparam_transform=hparam_transform,
  )
  settings = {"inner_lr": inner_lr, "outer_lr": outer_lr, "adjoint_lr": adjoint_lr}
  return loop._replace(config={**loop.config, "method": "soba", **settings})


def amigo(
  inner_loss: Callable[..., Any],
  outer_loss: Callable[..., Any],
  inner_optimizer: optax.GradientTransformation,
  outer_optimizer: optax.GradientTransformation,
  *,
  inner_steps: int = 10,
  adjoint_steps: int = 10,
  adjoint_lr: float | jax.Array,
  hparam_transform: Any = None,
) -> Bilevel:
  """AmIGO (Arbel & Mairal, ICLR 2022): warm-started inner and adjoint solves of a few steps.

  Each iteration runs `inner_steps` optimiser steps on the weights from where the last
  iteration left them, `adjoint_steps` gradient steps (`ih.Richardson`) on the adjoint
  quadratic from the last adjoint, and one hyperparameter step. The adjoint steps here
  share the last training minibatch, where the paper samples one per step.

  Args:
    inner_loss, outer_loss: as in `bilevel`.
    inner_optimizer, outer_optimizer: optax transformations (the paper uses SGD).
    inner_steps: T, weight steps per iteration.
    adjoint_steps: N, adjoint steps per iteration.
    adjoint_lr: the adjoint's step (below ``2 / lambda_max`` of the Hessian).
    hparam_transform: as in `bilevel`.

  Returns:
    A `Bilevel`.

  References:
    Arbel & Mairal, "Amortized implicit differentiation for stochastic bilevel
    optimization", ICLR 2022. https://arxiv.org/abs/2111.14580
  """
  loop = bilevel(
    inner_loss,
    outer_loss,
    inner_optimizer,
    outer_optimizer,
    inner_steps=inner_steps,
    solver=Richardson(step_size=adjoint_lr, steps=adjoint_steps),
    hparam_transform=hparam_transform,
  )
  return loop._replace(config={**loop.config, "method": "amigo", "adjoint_lr": adjoint_lr})
