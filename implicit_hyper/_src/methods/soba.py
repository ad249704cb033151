"""SOBA (Dagreou, Ablin, Vaiter & Moreau, NeurIPS 2022): one step of each variable per iteration."""

from collections.abc import Callable
from typing import Any

import jax
import optax

from implicit_hyper._src.methods import _common
from implicit_hyper._src.methods._common import Bilevel
from implicit_hyper._src.methods.implicit import bilevel
from implicit_hyper._src.solvers.richardson import Richardson


def soba(
  inner_loss: Callable[..., Any],
  outer_loss: Callable[..., Any],
  *,
  inner_lr: float | jax.Array | optax.Schedule,
  outer_lr: float | jax.Array | optax.Schedule,
  adjoint_lr: float | jax.Array | None = None,
  hparam_transform: Any = None,
  loss_has_aux: bool = False,
) -> Bilevel:
  r"""SOBA: single-loop stochastic bilevel optimisation with a moving adjoint.

  With minibatch estimates at every iteration,

  .. math::
    \theta \leftarrow \theta - \rho \nabla_\theta L_T, \quad
    u \leftarrow u - \rho (H u - \nabla_\theta L_V), \quad
    \lambda \leftarrow \lambda - \gamma (\nabla_\lambda L_V
      - \nabla^2_{\lambda\theta} L_T\, u),

  i.e. `bilevel` with one SGD step on the weights, ``Richardson(step_size=rho, steps=1)``
  on the adjoint (``BilevelState.method_state.solver`` holds u) and SGD on the hyperparameters.
  Updates are taken in turn (weights, then adjoint and hyperparameters at the new
  weights), the alternating form of the paper's update. (The paper's ``v`` is ``-u``.)
  Cost per iteration: two gradients of the training loss (one for the step, one inside
  the Hessian-vector product's linearisation), one Hessian-vector product, one mixed
  product and one gradient of the validation loss.

  Args:
    inner_loss: ``inner_loss(params, hparams, *args)`` -> scalar training loss.
    outer_loss: ``outer_loss(params, hparams, *args)`` -> scalar validation loss.
    inner_lr: rho, the weights' step: a number or an `optax.Schedule` of optax's update
      count, which is the iteration count t = ``state.step`` (from 0).
    outer_lr: gamma, the hyperparameters' step: a number or a schedule of optax's count,
      t less the steps the divergence guard skipped (`bilevel` keeps the outer state of
      a skipped step).
    adjoint_lr: the adjoint's step (rho when None): a number only, the step of
      ``Richardson``; with a schedule `inner_lr`, pass a number here. (`ih.saba` and
      `ih.fsla` take a schedule for their adjoint.)
    hparam_transform: as in `bilevel`.
    loss_has_aux: as in `bilevel`.

  Returns:
    A `Bilevel` whose `step` takes ``inner_args`` with a leading axis of 1.

  References:
    Dagreou, Ablin, Vaiter & Moreau, "A framework for bilevel optimization that enables
    stochastic and global variance reduction algorithms", NeurIPS 2022.
    https://arxiv.org/abs/2201.13409
  """
  _common.check_rates("soba", inner_lr=inner_lr, outer_lr=outer_lr, adjoint_lr=adjoint_lr)
  default = adjoint_lr is None
  adjoint_lr = inner_lr if adjoint_lr is None else adjoint_lr
  if callable(adjoint_lr):
    raise ValueError(
      "`soba(adjoint_lr=...)` must be a number: the adjoint's step is that of "
      "`Richardson(step_size=...)`, which takes no schedule"
      + (" (it defaults to inner_lr, a schedule here)" if default else "")
      + f"; pass a number `adjoint_lr=`, got {adjoint_lr!r}."
    )
  loop = bilevel(
    inner_loss,
    outer_loss,
    optax.sgd(inner_lr),
    optax.sgd(outer_lr),
    inner_steps=1,
    solver=Richardson(step_size=adjoint_lr, steps=1),
    hparam_transform=hparam_transform,
    loss_has_aux=loss_has_aux,
  )
  settings = {"inner_lr": inner_lr, "outer_lr": outer_lr, "adjoint_lr": adjoint_lr}
  return loop._replace(config={**loop.config, **_common.config("soba", **settings)})
