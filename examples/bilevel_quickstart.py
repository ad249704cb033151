"""Bilevel quickstart: one weight decay per pixel for logistic regression on digits.

The online loop of docs/concepts/online-loop.md as a script: `ih.bilevel` alternates
10 SGD steps on the weights with one Adam step on the log weight decays (hypergradient by a
Neumann series, Lorraine et al. 2020, Algorithm 1), and `ih.fit` runs it with a progress
bar, a metric history (metrics.json) and resumable checkpoints in --out. Stop it and start it again:
it resumes from the last checkpoint.

  python examples/bilevel_quickstart.py [--quick] [--out DIR]
"""

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import implicit_hyper as ih


def cross_entropy(params, x, y):
  logits = x @ params["w"] + params["b"]
  return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0])


def train_loss(params, hparams, x, y):  # the losses see the constrained decay, exp(raw) > 0
  return cross_entropy(params, x, y) + 0.5 * jnp.sum(hparams["decay"][:, None] * params["w"] ** 2)


def val_loss(params, hparams, x, y):
  return cross_entropy(params, x, y)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a few steps, for smoke tests")
  parser.add_argument("--out", type=Path, default=Path("out/bilevel_quickstart"))
  args = parser.parse_args(argv)

  x, y = load_digits(return_X_y=True)
  x = x / 16.0
  x_train, y_train, x_val, y_val = x[:200], y[:200], x[200:1000], y[200:1000]

  def batches(step):  # (inner_args, outer_args), the same for the same step: exact resumption
    rng = np.random.default_rng(step)
    i, j = rng.integers(0, 200, (10, 50)), rng.integers(0, 800, 200)
    return (x_train[i], y_train[i]), (x_val[j], y_val[j])

  loop = ih.bilevel(
    train_loss,
    val_loss,
    optax.sgd(0.5),
    optax.adam(0.05),
    inner_steps=10,
    solver=ih.Neumann(steps=10),
    hparam_transform="exp",
  )
  params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}
  state = loop.init(params, {"decay": jnp.full(64, jnp.log(1e-3))})
  state, history = ih.fit(
    loop,
    state,
    batches,
    num_steps=20 if args.quick else 300,
    checkpoint_dir=args.out / "checkpoints",
    checkpoint_every=100,
    metrics_path=args.out / "metrics.json",
  )
  decay = loop.constrain(state.hparams)["decay"]
  print(f"validation loss {history[-1]['outer_loss']:.3f}, {state.num_skipped} steps skipped")
  print(f"weight decay per pixel: min {decay.min():.2g}, max {decay.max():.2g}")


if __name__ == "__main__":
  main()
