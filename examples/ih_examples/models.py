"""The flax.nnx model of the examples, split once into a graph and a pytree of weights."""

import math
from collections.abc import Callable
from collections.abc import Sequence

import jax
from flax import nnx


class MLP(nnx.Module):
  """A fully connected network on flattened inputs.

  Each width in `hidden` adds an `nnx.Linear` layer followed by `activation`; a linear
  layer with `outputs` units comes last. With ``hidden=()`` it is a linear model
  (multinomial logistic regression when its outputs are read as logits).

  Inputs carry a leading batch axis: (N, ...) -> (N, outputs), with ``inputs`` the size
  of one flattened example.
  """

  def __init__(
    self,
    inputs: int,
    hidden: Sequence[int],
    outputs: int,
    *,
    activation: Callable = nnx.relu,
    rngs: nnx.Rngs,
  ):
    widths = (inputs, *hidden)
    self.hidden = nnx.List(
      [nnx.Linear(m, n, rngs=rngs) for m, n in zip(widths[:-1], widths[1:], strict=True)]
    )
    self.out = nnx.Linear(widths[-1], outputs, rngs=rngs)
    self.activation = activation

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for layer in self.hidden:
      x = self.activation(layer(x))
    return self.out(x)


def mlp(key: jax.Array, x: jax.Array, *, hidden: Sequence[int], outputs: int, **kwargs):
  """An `MLP` for inputs shaped like `x` (N, ...), its weights drawn from `key`, split once.

  Returns ``(graphdef, params)`` from ``nnx.split(model, nnx.Param)``: `params` is the
  `nnx.State` of the weights, the pytree the examples train and tune, and
  ``nnx.merge(graphdef, params)(x)`` is the model's output. `kwargs` go to `MLP`.
  """
  inputs = math.prod(x.shape[1:])
  model = MLP(inputs, hidden, outputs, rngs=nnx.Rngs(params=key), **kwargs)
  return nnx.split(model, nnx.Param)
