"""Constrained hyperparameters: the losses see ``transform(raw)``, the optimiser updates ``raw``."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

TRANSFORMS = {"exp": jnp.exp, "softplus": jax.nn.softplus, "sigmoid": jax.nn.sigmoid}


def hparam_transformation(spec: Any) -> Callable[[Any], Any]:
  """Turns a `hparam_transform` spec into a function from raw to constrained hparams.

  `spec` is None (identity), a name in `TRANSFORMS`, a callable applied to every leaf, or
  a pytree prefix of the hyperparameters holding those (e.g. ``{"decay": "exp", "p":
  "sigmoid", "bias": None}``).
  """

  def leaf_transform(s: Any) -> Callable[[Any], Any]:
    if s is None:
      return lambda x: x
    if isinstance(s, str):
      if s not in TRANSFORMS:
        raise ValueError(
          f"`bilevel(hparam_transform=...)`: unknown transform {s!r}; use one of "
          f"{sorted(TRANSFORMS)}, a callable, or None."
        )
      return TRANSFORMS[s]
    if callable(s):
      return s
    raise TypeError(f"`bilevel(hparam_transform=...)`: {s!r} is not a name or a callable.")

  def is_spec_leaf(s: Any) -> bool:
    return s is None or isinstance(s, str) or callable(s)

  transforms = jax.tree.map(leaf_transform, spec, is_leaf=is_spec_leaf)
  if callable(transforms):
    return lambda raw: jax.tree.map(transforms, raw)
  return lambda raw: jax.tree.map(lambda f, sub: jax.tree.map(f, sub), transforms, raw)
