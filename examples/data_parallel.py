"""Data-parallel per-weight-decay tuning on every device JAX sees.

An MLP is trained with one L2 decay per weight, and the decays are tuned online by
implicit hypergradients with `ih.bilevel` (Lorraine et al. 2020, Algorithm 1): a few
SGD steps on the weights, then one Adam step on the log-decays along the Neumann
hypergradient of the validation loss. Every training and validation batch is split
across a 1-D mesh of all devices (`NamedSharding`, rows along the "batch" axis);
weights and decays are replicated, and `jax.jit` turns the means in the losses into
cross-device reductions, so each gradient and Hessian-vector product is a global one.
The script prints the device count and the throughput and writes metrics.json to --out.

  python examples/data_parallel.py --quick
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/data_parallel.py
"""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
from ih_examples import cli
from ih_examples import datasets
from ih_examples import splits
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import implicit_hyper as ih


def init_mlp(rng, sizes):
  """Weights and biases (float32 numpy) of an MLP with layer widths `sizes`."""
  return [
    {
      "w": (rng.normal(size=(fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32),
      "b": np.zeros(fan_out, np.float32),
    }
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True)
  ]


def mlp(params, x):
  x = x.reshape(x.shape[0], -1)
  for layer in params[:-1]:
    x = jnp.tanh(x @ layer["w"] + layer["b"])
  return x @ params[-1]["w"] + params[-1]["b"]


def cross_entropy(params, batch):
  x, labels = batch
  logits = mlp(params, x)
  true_logit = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  return jnp.mean(jax.nn.logsumexp(logits, axis=1) - true_logit)


@jax.jit
def evaluate(params, batch):
  """The cross-entropy and the accuracy on `batch`."""
  x, labels = batch
  return cross_entropy(params, batch), jnp.mean(jnp.argmax(mlp(params, x), axis=1) == labels)


def train_loss(params, decay, x, y):
  """Cross-entropy plus ``sum_i decay_i w_i^2 / 2``, one decay per weight."""
  penalty = otu.tree_sum(jax.tree.map(lambda w, d: jnp.sum(d * w**2), params, decay))
  return cross_entropy(params, (x, y)) + 0.5 * penalty


def val_loss(params, decay, x, y):
  del decay
  return cross_entropy(params, (x, y))


def main(argv=None):
  parser = cli.common_args(__doc__.splitlines()[0], datasets=("digits", "mnist", "cifar10"))
  parser.add_argument("--per-device-batch", type=int, default=32, help="rows per device")
  parser.add_argument("--hidden", type=int, default=128, help="hidden units")
  parser.add_argument("--learning-rate", type=float, default=0.3, help="SGD step on the weights")
  parser.add_argument("--hyper-steps", type=int, default=100, help="hyperparameter updates")
  parser.add_argument("--inner-steps", type=int, default=10, help="SGD steps per hyper step")
  parser.add_argument("--neumann-steps", type=int, default=20, help="Neumann series terms")
  args = parser.parse_args(argv)
  if args.quick:
    args.hidden, args.hyper_steps, args.inner_steps, args.neumann_steps = 16, 3, 2, 3
    args.per_device_batch = min(args.per_device_batch, 8)

  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
  by_rows, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
  global_batch = args.per_device_batch * len(devices)
  print(f"devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform})")
  print(f"global batch: {global_batch} rows ({args.per_device_batch} per device)")

  data = datasets.load_dataset(args.dataset, data_dir=args.data_dir, seed=args.seed)
  n_train = n_val = max(global_batch, 500 if args.quick else len(data.x) // 3)
  (x_train, y_train), (x_val, y_val), (x_test, y_test) = splits.split(
    data, (n_train, n_val, None), seed=args.seed
  )
  train_batches = splits.batches(x_train, y_train, global_batch, seed=args.seed)
  val_batches = splits.batches(x_val, y_val, global_batch, seed=args.seed + 1)

  sizes = (int(np.prod(x_train.shape[1:])), args.hidden, data.num_classes)
  loop = ih.bilevel(
    train_loss,
    val_loss,
    optax.sgd(args.learning_rate),
    optax.adam(0.05),
    inner_steps=args.inner_steps,
    # The series step equal to the SGD step: K terms differentiate K SGD steps taken from
    # the optimum (Lorraine et al., Theorem 1), and need no eigenvalue estimate.
    solver=ih.Neumann(steps=args.neumann_steps, alpha=args.learning_rate),
    hparam_transform="exp",  # the decays are exp(raw), the optimiser updates raw
  )

  params = init_mlp(np.random.default_rng(args.seed), sizes)
  log_decay = jax.tree.map(lambda w: np.full_like(w, np.log(1e-3)), params)
  state = jax.jit(loop.init, out_shardings=replicated)(params, log_decay)
  step = jax.jit(loop.step)

  def next_batches():
    """`inner_steps` training batches and one validation batch, rows split across devices."""
    inner = [next(train_batches) for _ in range(args.inner_steps)]
    inner = jax.tree.map(lambda *rows: np.stack(rows), *inner)
    return (
      jax.device_put(inner, NamedSharding(mesh, P(None, "batch"))),
      jax.device_put(next(val_batches), by_rows),
    )

  start = time.perf_counter()
  jax.block_until_ready(step(state, *next_batches()))  # compiles; the result is discarded
  compile_s = time.perf_counter() - start
  initial_val_loss = float(evaluate(state.params, (x_val, y_val))[0])

  start = time.perf_counter()
  for _ in range(args.hyper_steps):
    state, _ = step(state, *next_batches())
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start

  train_rows = args.hyper_steps * args.inner_steps * global_batch
  decays = np.exp(np.concatenate([np.ravel(h) for h in jax.tree.leaves(state.hparams)]))
  diverged = int(state.num_skipped)
  metrics = {
    "devices": len(devices),
    "platform": devices[0].platform,
    "device_kind": devices[0].device_kind,
    "global_batch": global_batch,
    "hyper_steps": args.hyper_steps,
    "inner_steps": args.inner_steps,
    "compile_seconds": compile_s,
    "seconds": seconds,
    "train_examples_per_second": train_rows / seconds,
    "hyper_steps_per_second": args.hyper_steps / seconds,
    "skipped_hyper_steps": diverged,
    "initial_val_loss": initial_val_loss,
    "final_val_loss": float(evaluate(state.params, (x_val, y_val))[0]),
    "test_accuracy": float(evaluate(state.params, (x_test, y_test))[1]),
    "decay_quantiles": np.quantile(decays, [0.1, 0.5, 0.9]).tolist(),
  }
  print(
    f"throughput: {metrics['train_examples_per_second']:.0f} training examples/s, "
    f"{metrics['hyper_steps_per_second']:.2f} hyper steps/s "
    f"({args.inner_steps} SGD steps + 1 hypergradient each; compile {compile_s:.1f} s)"
  )
  print(
    f"validation loss {initial_val_loss:.3f} -> {metrics['final_val_loss']:.3f}, "
    f"test accuracy {metrics['test_accuracy']:.3f}, "
    f"skipped (diverged) hyper steps {diverged}/{args.hyper_steps}"
  )
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
  print(f"wrote {args.out / 'metrics.json'}")
  return metrics


if __name__ == "__main__":
  main()
