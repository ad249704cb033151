"""AmIGO (Arbel & Mairal, ICLR 2022): warm-started inner and adjoint solves of a few steps."""

from collections.abc import Callable
from typing import Any

import jax
import optax

from implicit_hyper._src.methods._common import Bilevel
from implicit_hyper._src.methods.implicit import bilevel
from implicit_hyper._src.solvers.richardson import Richardson


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
  loss_has_aux: bool = False,
) -> Bilevel:
  r"""AmIGO: amortised implicit gradient optimisation.

  Each iteration runs `inner_steps` optimiser steps on the weights from where the last
  iteration left them, `adjoint_steps` gradient steps (`ih.Richardson`) on the adjoint
  quadratic from the last adjoint (``BilevelState.method_state.solver``), and one
  hyperparameter step:

  .. math::
    u \leftarrow u - \eta (H u - \nabla_\theta L_V) \ (N \text{ times}), \quad
    \lambda \leftarrow \lambda - \gamma (\nabla_\lambda L_V
      - \nabla^2_{\lambda\theta} L_T\, u).

  The adjoint steps here share the last training minibatch, where the paper samples one
  per step. Cost per iteration: T + 1 training gradients, N Hessian-vector products, one
  mixed product and one validation gradient.

  Args:
    inner_loss, outer_loss: as in `bilevel`.
    inner_optimizer, outer_optimizer: optax transformations (the paper uses SGD).
    inner_steps: T, weight steps per iteration.
    adjoint_steps: N, adjoint steps per iteration.
    adjoint_lr: the adjoint's step (below ``2 / lambda_max`` of the Hessian).
    hparam_transform: as in `bilevel`.
    loss_has_aux: as in `bilevel`.

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
    loss_has_aux=loss_has_aux,
  )
  return loop._replace(config={**loop.config, "method": "amigo", "adjoint_lr": adjoint_lr})
