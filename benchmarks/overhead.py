"""Overhead: the wall time of `ih.bilevel` training against plain training of the same model.

An MLP (digits, 64-13514-10) and a CNN (digits as 8 x 8 images: two 3 x 3 convolutions of
16 and 32 channels, a dense layer of 512, no biases), each with about a million weights and
one weight decay ``exp(log_decay)`` per weight, on minibatches of 64 images. In one
interleaved run (each round calls every function once, so load from other processes spreads
over all of them):

  plain T        T steps of SGD on the training loss in a jitted `lax.scan`: training
                 without tuning, as a user writes it
  bilevel T, K   one jitted `ih.bilevel` step: the same T SGD steps, then the hypergradient
                 with `Neumann(steps=K, alpha=1/lambda_max)` (K Hessian-vector products,
                 the step estimated once beforehand) and an Adam step on the decays; each
                 call gets the state the previous call returned, as in a training loop
  gradient, HVP  `PRODUCTS` gradients, and as many forward-over-reverse products, in a
                 `fori_loop`: c = t(HVP) / t(gradient)

The measured ratio t(bilevel T, K) / t(plain T) is reported beside the floor
(T + c K + 2) / T: the T training gradients, K products and two more gradients (the
validation loss's and the mixed product). measured / floor is what the loop adds beyond the
products it must compute; the target is <= 1.10. Every ratio is the median over rounds of
the ratio within a round. Compile times (lower + compile) are reported separately; the
script also checks that the jitted step compiled once over the run and that its program
holds no host callback.

  python benchmarks/overhead.py              # T in 1 5 10 50, K in 5 20 (CPU: minutes)
"""

import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

import implicit_hyper as ih

try:
  import _common
except ImportError:  # imported as benchmarks.overhead
  from benchmarks import _common

PRODUCTS = 10  # gradients (and HVPs) per timed loop of the c measurement
TARGET = 1.10


def cross_entropy_of(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def cnn_logits(params, x):
  conv = lambda h, w: jax.lax.conv_general_dilated(
    h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  h = jax.nn.relu(conv(jax.nn.relu(conv(x, params["conv1"])), params["conv2"]))
  h = jax.nn.relu(h.reshape(len(x), -1) @ params["dense1"])
  return h @ params["dense2"]


def mlp_logits(params, x):
  return jax.nn.relu(x @ params["w1"]) @ params["w2"]


def make_losses(logits_fn):
  """``(inner_loss, outer_loss)``: cross-entropy plus one L2 decay per weight, and CE."""

  def inner_loss(params, log_decay, x, y):
    penalty = jax.tree.map(lambda w, ld: jnp.sum(jnp.exp(ld) * w**2), params, log_decay)
    return cross_entropy_of(logits_fn(params, x), y) + sum(jax.tree.leaves(penalty))

  def outer_loss(params, log_decay, x, y):
    del log_decay
    return cross_entropy_of(logits_fn(params, x), y)

  return inner_loss, outer_loss


def make_model(name: str, *, quick: bool, batch_size: int, seed: int = 0):
  """``(inner_loss, outer_loss, params, log_decay, train, val)`` of the MLP or the CNN."""
  images, labels = _common.load_digits()
  rng = np.random.default_rng(seed)
  rows = rng.permutation(len(labels))
  half = len(rows) // 2
  he = lambda *shape: jnp.asarray(
    (rng.standard_normal(shape) * np.sqrt(2.0 / math.prod(shape[:-1]))).astype(np.float32)
  )
  if name == "mlp":
    hidden = 16 if quick else _common.hidden_for(1e6)
    params = {"w1": he(_common.NUM_FEATURES, hidden), "w2": he(hidden, _common.NUM_CLASSES)}
    shape, logits_fn = (-1, _common.NUM_FEATURES), mlp_logits
  else:
    c1, c2, dense = (2, 4, 8) if quick else (16, 32, 512)
    params = {
      "conv1": he(3, 3, 1, c1),
      "conv2": he(3, 3, c1, c2),
      "dense1": he(8 * 8 * c2, dense),
      "dense2": he(dense, _common.NUM_CLASSES),
    }
    shape, logits_fn = (-1, 8, 8, 1), cnn_logits
  batch = lambda part: (
    jnp.asarray((images[part[:batch_size]] / 16.0).astype(np.float32).reshape(shape)),
    jnp.asarray(labels[part[:batch_size]]),
  )
  log_decay = jax.tree.map(lambda w: jnp.full(w.shape, np.log(1e-4), jnp.float32), params)
  inner_loss, outer_loss = make_losses(logits_fn)
  return inner_loss, outer_loss, params, log_decay, batch(rows[:half]), batch(rows[half:])


def inverse_largest_eigenvalue(inner_loss, params, log_decay, train):
  matvec = ih.hessian_vector_product(inner_loss, params, log_decay, train)
  return 1.0 / ih.max_eigenvalue(matvec, params)


def repeated_products(inner_loss, kind: str, alpha: float):
  """`PRODUCTS` steps ``v <- v - alpha P(v)``: P the gradient, or the HVP at `params`."""

  def run(params, log_decay, train):
    grad = lambda w: jax.grad(inner_loss)(w, log_decay, *train)
    product = grad if kind == "gradient" else lambda v: jax.jvp(grad, (params,), (v,))[1]
    step = lambda _, v: otu.tree_add_scale(v, -alpha, product(v))
    return jax.lax.fori_loop(0, PRODUCTS, step, params)

  return run


def plain_training(inner_loss, optimizer):
  """T optimiser steps, one per leading slice of `batches`: training without tuning."""

  def train(carry, log_decay, batches):
    def one_step(carry, batch):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(inner_loss)(params, log_decay, *batch)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    carry, losses = jax.lax.scan(one_step, carry, batches)
    return carry, jnp.mean(losses)

  return train


class Threaded:
  """A zero-argument call of ``fn(state, *args) -> (state, out)`` that keeps the new state."""

  def __init__(self, fn, state, *args):
    self.fn, self.state, self.args = fn, state, args

  def __call__(self):
    self.state, out = self.fn(self.state, *self.args)
    return self.state, out


def compile_seconds(fn, *args) -> float:
  start = time.perf_counter()
  jax.jit(fn).lower(*args).compile()
  return time.perf_counter() - start


def host_callbacks(fn, *args) -> int:
  """How many host-callback equations the jaxpr of `fn` holds (nested ones included)."""
  text = str(jax.make_jaxpr(fn)(*args))
  return text.count("callback[")


def benchmark_model(
  name: str, *, inner_steps, solver_steps, rounds: int, quick: bool, lr: float, batch_size: int
):
  inner_loss, outer_loss, params, log_decay, train, val = make_model(
    name, quick=quick, batch_size=16 if quick else batch_size
  )
  weights = sum(w.size for w in jax.tree.leaves(params))
  alpha = float(
    jax.jit(functools.partial(inverse_largest_eigenvalue, inner_loss))(params, log_decay, train)
  )
  inner_opt = optax.sgd(lr)
  stacked = lambda t: jax.tree.map(lambda a: jnp.stack([a] * t), train)
  calls, compiles, steps = {}, {}, {}
  for kind in ("gradient", "HVP"):
    fn = repeated_products(inner_loss, kind, alpha)
    compiles[kind] = compile_seconds(fn, params, log_decay, train)
    calls[kind] = functools.partial(jax.jit(fn), params, log_decay, train)
  for t in inner_steps:
    fn = plain_training(inner_loss, inner_opt)
    carry = (params, inner_opt.init(params))
    compiles[f"plain {t}"] = compile_seconds(fn, carry, log_decay, stacked(t))
    calls[f"plain {t}"] = Threaded(jax.jit(fn), carry, log_decay, stacked(t))
  callbacks = {}
  for t in inner_steps:
    for k in solver_steps:
      loop = ih.bilevel(
        inner_loss,
        outer_loss,
        inner_opt,
        optax.adam(1e-3),
        inner_steps=t,
        solver=ih.Neumann(steps=k, alpha=alpha),
      )
      state, key = loop.init(params, log_decay), f"bilevel {t} {k}"
      compiles[key] = compile_seconds(loop.step, state, stacked(t), val)
      callbacks[key] = host_callbacks(loop.step, state, stacked(t), val)
      steps[key] = jax.jit(loop.step)
      calls[key] = Threaded(steps[key], state, stacked(t), val)
  samples, _ = _common.time_interleaved(calls, rounds=rounds)
  c = [h / g for h, g in zip(samples["HVP"], samples["gradient"], strict=True)]
  points = []
  for t in inner_steps:
    for k in solver_steps:
      measured = [
        b / p for b, p in zip(samples[f"bilevel {t} {k}"], samples[f"plain {t}"], strict=True)
      ]
      floors = [(t + ci * k + 2) / t for ci in c]
      points.append(
        {
          "inner_steps": t,
          "solver_steps": k,
          "plain_seconds": _common.median(samples[f"plain {t}"]),
          "bilevel_seconds": _common.median(samples[f"bilevel {t} {k}"]),
          "measured_ratio": _common.median(measured),
          "floor": (t + _common.median(c) * k + 2) / t,
          "measured_over_floor": _common.median(
            [m / f for m, f in zip(measured, floors, strict=True)]
          ),
          "compile_seconds": compiles[f"bilevel {t} {k}"],
        }
      )
  return {
    "model": name,
    "weights": int(weights),
    "hyperparameters": int(weights),
    "alpha": alpha,
    "c": _common.median(c),
    "gradient_seconds": _common.median(samples["gradient"]) / PRODUCTS,
    "hvp_seconds": _common.median(samples["HVP"]) / PRODUCTS,
    "compile_seconds": compiles,
    "host_callbacks": callbacks,
    "compilations_per_step": {key: int(fn._cache_size()) for key, fn in steps.items()},
    "rounds": len(c),
    "points": points,
    "samples": samples,
  }


def print_model(r) -> None:
  """Prints one model's table."""
  print(
    f"\n{r['model']}: {r['weights']:,} weights and decays, c = t(HVP)/t(gradient) = "
    f"{r['c']:.2f} (gradient {_common.format_seconds(r['gradient_seconds'])}), "
    f"{r['rounds']} rounds; compilations per step: {set(r['compilations_per_step'].values())}"
    f", host callbacks: {sum(r['host_callbacks'].values())}"
  )
  _common.print_table(
    ["T", "K", "plain T", "bilevel step", "measured", "floor", "measured / floor", "compile"],
    [
      [
        p["inner_steps"],
        p["solver_steps"],
        _common.format_seconds(p["plain_seconds"]),
        _common.format_seconds(p["bilevel_seconds"]),
        f"{p['measured_ratio']:.2f}",
        f"{p['floor']:.2f}",
        f"{p['measured_over_floor']:.3f}",
        f"{p['compile_seconds']:.2f} s",
      ]
      for p in r["points"]
    ],
  )


def main(argv=None):
  parser = _common.common_args(__doc__.splitlines()[0])
  parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 5, 10, 50], help="T")
  parser.add_argument("--solver-steps", type=int, nargs="+", default=[5, 20], help="K")
  parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
  parser.add_argument("--rounds", type=int, default=5, help="timed calls per function")
  parser.add_argument("--lr", type=float, default=0.05, help="SGD step of the inner training")
  parser.add_argument("--batch-size", type=int, default=64)
  args = parser.parse_args(argv)
  inner_steps = [1, 2] if args.quick else args.inner_steps
  solver_steps = [2] if args.quick else args.solver_steps
  rounds = 2 if args.quick else args.rounds
  load_before = os.getloadavg()
  results = []
  for name in args.models:
    print(f"{name}...", flush=True)
    results.append(
      benchmark_model(
        name,
        inner_steps=inner_steps,
        solver_steps=solver_steps,
        rounds=rounds,
        quick=args.quick,
        lr=args.lr,
        batch_size=args.batch_size,
      )
    )
    print_model(results[-1])
  worst = max(p["measured_over_floor"] for r in results for p in r["points"])
  print(f"\nworst measured / floor: {worst:.3f} (target <= {TARGET})")
  payload = {
    "machine": _common.machine(),
    "load_average_before": load_before,
    "load_average_after": os.getloadavg(),
    "products_per_loop": PRODUCTS,
    "target": TARGET,
    "worst_measured_over_floor": worst,
    "results": results,
  }
  _common.write_json(args.out, "overhead", payload)


if __name__ == "__main__":
  main()
