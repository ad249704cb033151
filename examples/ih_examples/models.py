"""The flax models of the examples."""

from collections.abc import Callable
from collections.abc import Sequence

import flax.linen as nn


class MLP(nn.Module):
  """A fully connected network on flattened inputs.

  Each width in `hidden` adds a Dense layer followed by `activation`; a linear Dense
  layer with `outputs` units comes last. With ``hidden=()`` it is a linear model
  (multinomial logistic regression when its outputs are read as logits).

  Attributes:
    hidden: widths of the hidden layers.
    outputs: number of outputs.
    activation: the nonlinearity after each hidden layer.

  Inputs carry a leading batch axis: (N, ...) -> (N, outputs).
  """

  hidden: Sequence[int]
  outputs: int
  activation: Callable = nn.relu

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = self.activation(nn.Dense(width)(x))
    return nn.Dense(self.outputs)(x)
