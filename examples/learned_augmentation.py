"""Learning a data-augmentation distribution by implicit differentiation.

The augmenter draws, for each training image x, a random affine warp and per-pixel
Gaussian noise,

    a_phi(x, z, e) = warp(x; mu + sigma * e) + s * z,      e ~ N(0, I_6), z ~ N(0, I),

a bilinear resampling of x at A p + t for A = I + (4 entries) and a shift t in pixels.
The hyperparameters phi are the logs of the warp's six standard deviations sigma and of
the per-pixel noise stds s (and, with --learn-mean, the warp's mean mu; zero otherwise).
The noise std starts at the value of the Gaussian-noise baseline, so that the learned
augmenter starts at that baseline plus small warps. A small CNN classifier theta is
trained on augmented training images; phi is tuned for the clean validation images:

    L_T(theta, phi) = CE(theta; a_phi(x_train, z, e)) + l2/2 ||theta||^2,
    L_V(theta)      = CE(theta; x_validation).

phi enters the training loss only, which the implicit function theorem needs. The loop
is the paper's Algorithm 1 (`ih.bilevel`): ten Adam steps on theta (fresh z and e for
each, passed in as data), then one Adam step on phi along the Neumann hypergradient,
after --warmup hyper steps at outer rate zero, as in the learned data augmentation of
Lorraine, Vicol & Duvenaud (AISTATS 2020). The baselines train the same classifier with
the same steps and minibatches on the clean training images, on training images plus
Gaussian noise of a fixed std (not tuned on validation data), and on the augmenter's
initial distribution, frozen. All are repeated over several seeds, each with its own
split, initialisation and noise.

    python examples/learned_augmentation.py [--quick] [--out DIR] [--seed N] [--seeds S]
        [--dataset digits|mnist|cifar10 --data-dir DIR]
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import optax.tree_utils as otu
from ih_examples import cli
from ih_examples import datasets
from ih_examples import plots
from ih_examples import splits

import implicit_hyper as ih

EVAL_CHUNK = 1000  # test images per forward pass
WARP_STD, SHIFT_STD = 0.05, 0.5  # the warp's initial stds: A - I's entries, shift in pixels
WARMUP = 100  # hyper steps at outer rate 0: the classifier first fits the initial augmentation


def parse_args(argv=None):
  parser = cli.common_args(__doc__.splitlines()[0], datasets=("digits", "mnist", "cifar10"))
  parser.add_argument("--seeds", type=int, default=None, help="repetitions (5; 3 with --quick)")
  parser.add_argument("--hyper-steps", type=int, default=None, help="hyper steps per seed (300)")
  parser.add_argument("--inner-steps", type=int, default=10, help="Adam steps per hyper step")
  parser.add_argument("--train-size", type=int, default=200, help="training images")
  parser.add_argument("--val-size", type=int, default=200, help="validation images")
  parser.add_argument("--batch-size", type=int, default=64, help="training images per step")
  parser.add_argument("--neumann-steps", type=int, default=20, help="Neumann series terms")
  parser.add_argument("--inner-lr", type=float, default=3e-3, help="Adam rate of the classifier")
  parser.add_argument("--outer-lr", type=float, default=1e-2, help="Adam rate of the augmenter")
  parser.add_argument("--l2", type=float, default=1e-4, help="classifier weight decay")
  parser.add_argument(
    "--noise-std", type=float, default=0.3, help="std of the Gaussian-noise baseline's noise"
  )
  parser.add_argument(
    "--warp-std", type=float, default=WARP_STD, help="initial std of each entry of A - I"
  )
  parser.add_argument(
    "--shift-std", type=float, default=SHIFT_STD, help="initial std of the shift, in pixels"
  )
  parser.add_argument(
    "--init-noise-std", type=float, default=None, help="initial pixel noise std (--noise-std)"
  )
  parser.add_argument("--learn-mean", action="store_true", help="tune the warp's mean too")
  parser.add_argument(
    "--warmup", type=int, default=None, help="first hyper steps at outer rate 0 (WARMUP)"
  )
  args = parser.parse_args(argv)
  quick = {"seeds": 3, "hyper_steps": 20}
  full = {"seeds": 5, "hyper_steps": 300}
  for name, value in (quick if args.quick else full).items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  if args.seeds < 2:
    parser.error("--seeds must be at least 2 for a standard deviation")
  if args.init_noise_std is None:
    args.init_noise_std = args.noise_std
  if args.warmup is None:
    args.warmup = min(WARMUP, args.hyper_steps // 2)
  return args


def patches3x3(x):
  """The 3x3 neighbourhoods of every pixel ('same' zero padding), stacked on channels.

  A 3x3 convolution is these patches times a matrix. Built from shifted slices rather
  than `lax.conv`: inside a loop (`ih.bilevel`'s `lax.scan` of inner steps and the
  Neumann series' `lax.fori_loop`), XLA:CPU ran the kernel gradient of `lax.conv` about
  30x slower here than outside one (compare jax-ml/jax#12868).
  """
  _, height, width, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  shifts = [padded[:, i : i + height, j : j + width] for i in range(3) for j in range(3)]
  return jnp.concatenate(shifts, axis=-1)


class Conv3x3(nn.Module):
  """A 3x3 convolution with 'same' padding and a bias."""

  features: int
  kernel_init: nn.initializers.Initializer = nn.linear.default_kernel_init

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.features, kernel_init=self.kernel_init)(patches3x3(x))


def average_pool(x):
  """2x2 average pooling; an odd height or width is padded with zeros first."""
  n, height, width, channels = x.shape
  x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
  return x.reshape(n, x.shape[1] // 2, 2, x.shape[2] // 2, 2, channels).mean(axis=(2, 4))


def affine_warp(x, warp):
  """Bilinear resampling of images x (n, h, w, c) at ``A (p - centre) + centre + shift``.

  `warp` (n, 6) holds ``A - I`` (4 entries, row-major) and the shift in pixels. Pixels
  that fall outside the image read zeros. The bilinear weights of every output pixel on
  every input pixel form one dense (h w, h w) matrix per image: small images only.
  """
  n, height, width, channels = x.shape
  rows, cols = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
  grid = jnp.stack([rows.ravel(), cols.ravel()], -1).astype(x.dtype)  # (hw, 2)
  centre = jnp.array([(height - 1) / 2, (width - 1) / 2], x.dtype)
  matrix = jnp.eye(2, dtype=x.dtype) + warp[:, :4].reshape(n, 2, 2)
  source = jnp.einsum("nij,pj->npi", matrix, grid - centre) + centre + warp[:, None, 4:]
  weights = jnp.prod(
    jax.nn.relu(1 - jnp.abs(source[:, :, None, :] - grid[None, None, :, :])), axis=-1
  )  # (n, hw_out, hw_in)
  out = jnp.einsum("npq,nqc->npc", weights, x.reshape(n, height * width, channels))
  return out.reshape(x.shape)


class AffineAugmenter(nn.Module):
  """``warp(x; mu + sigma * e) + s * z``: a random affine warp and per-pixel noise.

  The parameters are log sigma (6), log s (one per pixel and channel) and, when
  `learn_mean`, mu (6; zero otherwise).
  """

  warp_std: float = 0.05
  shift_std: float = 0.5
  noise_std: float = 0.3
  learn_mean: bool = False

  @nn.compact
  def __call__(self, x, noise, warp_noise):
    init_log_std = jnp.log(jnp.array([self.warp_std] * 4 + [self.shift_std] * 2))
    mean = self.param("warp_mean", nn.initializers.zeros, (6,)) if self.learn_mean else 0.0
    log_std = self.param("warp_log_std", lambda _, s: init_log_std, (6,))
    log_noise = self.param(
      "noise_log_std", lambda _, s: jnp.full(s, jnp.log(self.noise_std)), x.shape[1:]
    )
    warped = affine_warp(x, mean + jnp.exp(log_std) * warp_noise)
    return warped + jnp.exp(log_noise) * noise


class Classifier(nn.Module):
  """Two 3x3 convolutions, each followed by ReLU and 2x2 pooling, then a linear layer."""

  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = average_pool(nn.relu(Conv3x3(16)(x)))
    x = average_pool(nn.relu(Conv3x3(32)(x)))
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def make_losses(augmenter, classifier, l2):
  """The training loss on augmented images, the clean one, and the validation loss."""

  def cross_entropy(params, x, y):
    logits = classifier.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def clean_train_loss(params, batch):
    x, y = batch
    return cross_entropy(params, x, y) + 0.5 * l2 * otu.tree_norm(params, squared=True)

  def augmented_train_loss(params, augmenter_params, x, y, noise, warp_noise):
    augmented = augmenter.apply({"params": augmenter_params}, x, noise, warp_noise)
    return clean_train_loss(params, (augmented, y))

  def validation_loss(params, augmenter_params, x, y):
    del augmenter_params  # Validation images are clean.
    return cross_entropy(params, x, y)

  return augmented_train_loss, clean_train_loss, validation_loss


def minibatches(rng, train, args):
  """`inner_steps` minibatches of training images and labels, and noise for each image."""
  x, y = train
  index = np.stack(
    [rng.choice(len(x), args.batch_size, replace=False) for _ in range(args.inner_steps)]
  )
  noise = rng.standard_normal((*index.shape, *x.shape[1:3], 1)).astype(np.float32)
  warp_noise = rng.standard_normal((*index.shape, 6)).astype(np.float32)
  return x[index], y[index], noise, warp_noise


def accuracy(predict, params, x, y):
  """Classification accuracy of `predict(params, x)`, in chunks of EVAL_CHUNK images."""
  correct = 0
  for start in range(0, len(x), EVAL_CHUNK):
    logits = predict(params, x[start : start + EVAL_CHUNK])
    correct += int(jnp.sum(jnp.argmax(logits, axis=-1) == y[start : start + EVAL_CHUNK]))
  return correct / len(x)


def plot_samples(images, samples, path):
  """Originals (first column) beside augmented samples, all on one grey scale."""
  rows, cols = len(images), 1 + samples.shape[1]
  low, high = min(images.min(), samples.min()), max(images.max(), samples.max())
  fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.1 * rows), squeeze=False)
  for r in range(rows):
    for c in range(cols):
      image = images[r] if c == 0 else samples[r, c - 1]
      ax = axes[r, c]
      ax.imshow(
        image[..., 0] if image.shape[-1] == 1 else np.clip(image, 0, 1),
        cmap="gray",
        vmin=low,
        vmax=high,
      )
      ax.set_xticks([])
      ax.set_yticks([])
  axes[0, 0].set_title("original", fontsize=9)
  for c in range(1, cols):
    axes[0, c].set_title(f"sample {c}", fontsize=9)
  fig.suptitle(f"Learned augmentation (grey scale {low:.2f} to {high:.2f})", fontsize=10)
  return plots.save_figure(fig, path)


class Experiment:
  """The jitted steps shared by every seed, and one seed's paired runs."""

  def __init__(self, args, num_classes):
    self.args = args
    self.augmenter = AffineAugmenter(
      args.warp_std, args.shift_std, args.init_noise_std, args.learn_mean
    )
    self.classifier = Classifier(num_classes)
    augmented_loss, clean_loss, validation_loss = make_losses(
      self.augmenter, self.classifier, args.l2
    )
    self.loop = ih.bilevel(
      augmented_loss,
      validation_loss,
      optax.adam(args.inner_lr),
      optax.adam(
        optax.schedules.join_schedules(
          [optax.constant_schedule(0.0), optax.constant_schedule(args.outer_lr)], [args.warmup]
        )
      ),
      inner_steps=args.inner_steps,
      # The classifier trains from scratch and its curvature grows fast: with the default
      # estimate of the Neumann step every 10 hyper steps, most early series diverge.
      solver=ih.Neumann(steps=args.neumann_steps, refresh_every=2),
    )
    self.hyper_step = jax.jit(self.loop.step)
    self.inner_optimizer = inner_optimizer = optax.adam(args.inner_lr)

    @jax.jit
    def baseline_steps(params, opt_state, batches, noise_std):
      """`inner_steps` Adam steps on ``x + noise_std * z``, like the inner loop of a hyper step."""

      def update(carry, batch):
        params, opt_state = carry
        x, y, noise, _ = batch
        grads = jax.grad(clean_loss)(params, (x + noise_std * noise, y))
        updates, opt_state = inner_optimizer.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), None

      return jax.lax.scan(update, (params, opt_state), batches)[0]

    self.baseline_steps = baseline_steps

    @jax.jit
    def frozen_steps(params, opt_state, batches, phi):
      """`inner_steps` Adam steps on the augmenter's initial, untuned augmentation."""

      def update(carry, batch):
        params, opt_state = carry
        grads = jax.grad(augmented_loss)(params, phi, *batch)
        updates, opt_state = inner_optimizer.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), None

      return jax.lax.scan(update, (params, opt_state), batches)[0]

    self.frozen_steps = frozen_steps
    self.predict = jax.jit(lambda params, x: self.classifier.apply({"params": params}, x))
    self.augment = jax.jit(
      lambda phi, x, noise, e: self.augmenter.apply({"params": phi}, x, noise, e)
    )

  def run(self, seed, data, bar):
    """Trains with the learned augmentation, without, and with Gaussian noise.

    Returns (results, the final `BilevelState`, the training set).
    """
    args = self.args
    train, validation, test = splits.train_validation_test(
      data, args.train_size, args.val_size, seed=seed
    )
    classifier_key, augmenter_key = jax.random.split(jax.random.key(seed))
    params = self.classifier.init(classifier_key, train[0][:1])["params"]
    phi = self.augmenter.init(
      augmenter_key, train[0][:1], train[0][:1, ..., :1], np.zeros((1, 6), np.float32)
    )["params"]
    state = self.loop.init(params, phi)
    baselines = {"noaug": 0.0, "noise": args.noise_std}
    trained = {name: (params, self.inner_optimizer.init(params)) for name in (*baselines, "frozen")}
    rng, start = np.random.default_rng(seed), time.perf_counter()
    for _ in range(args.hyper_steps):
      batches = minibatches(rng, train, args)
      state, metrics = self.hyper_step(state, batches, validation)
      for name, noise_std in baselines.items():
        trained[name] = self.baseline_steps(*trained[name], batches, noise_std)
      trained["frozen"] = self.frozen_steps(*trained["frozen"], batches, phi)
      bar.set_postfix(seed=seed, train_loss=float(metrics.inner_loss), refresh=False)
      bar.update()
    final = {"aug": state.params, **{name: p for name, (p, _) in trained.items()}}
    results = {"seed": seed}
    for name, final_params in final.items():
      results[f"{name}_test_acc"] = accuracy(self.predict, final_params, *test)
      results[f"{name}_val_acc"] = accuracy(self.predict, final_params, *validation)
    results |= {
      "warp_std": np.exp(state.hparams["warp_log_std"]).tolist(),
      "noise_std": float(np.exp(state.hparams["noise_log_std"]).mean()),
      "skipped_hyper_steps": int(metrics.num_skipped),
      "seconds": time.perf_counter() - start,
      "test_size": len(test[0]),
    }
    return results, state, train


def learned_distribution(runs):
  """The learned stds, averaged over seeds: A - I's entries, the shift, the pixel noise."""
  warp = np.array([run["warp_std"] for run in runs]).mean(axis=0)
  return {
    "linear_std": warp[:4].tolist(),
    "shift_std": warp[4:].tolist(),
    "noise_std": float(np.mean([run["noise_std"] for run in runs])),
  }


def main(argv=None):
  args = parse_args(argv)
  data = datasets.load_dataset(args.dataset, data_dir=args.data_dir, seed=args.seed)
  experiment = Experiment(args, data.num_classes)
  runs = []
  with cli.progress(total=args.seeds * args.hyper_steps, desc="hyper steps") as bar:
    for seed in range(args.seed, args.seed + args.seeds):
      results, state, train = experiment.run(seed, data, bar)
      runs.append(results)

  # Five augmented samples of eight training images of the last seed.
  x = train[0][:8]
  sample_rng = np.random.default_rng(args.seed)
  noise = sample_rng.standard_normal((5, *x.shape[:3], 1)).astype(np.float32)
  warp_noise = sample_rng.standard_normal((5, len(x), 6)).astype(np.float32)
  samples = np.stack(
    [experiment.augment(state.hparams, x, z, e) for z, e in zip(noise, warp_noise, strict=True)], 1
  )
  plot_samples(x, samples, args.out / "learned_augmentation.png")

  test_acc = {
    k: np.array([run[f"{k}_test_acc"] for run in runs]) for k in ("aug", "noaug", "noise", "frozen")
  }
  result = {}
  for name, accuracies in test_acc.items():
    result[f"{name}_test_acc_mean"] = accuracies.mean()
    result[f"{name}_test_acc_std"] = accuracies.std(ddof=1)
  result |= {
    "num_hyperparams": sum(leaf.size for leaf in jax.tree.leaves(state.hparams)),
    "test_acc_gain_mean": (test_acc["aug"] - test_acc["noaug"]).mean(),
    "test_acc_gain_std": (test_acc["aug"] - test_acc["noaug"]).std(ddof=1),
    "noise_std": args.noise_std,
    "vs_noise_gain_mean": (test_acc["aug"] - test_acc["noise"]).mean(),
    "vs_noise_gain_std": (test_acc["aug"] - test_acc["noise"]).std(ddof=1),
    "vs_frozen_gain_mean": (test_acc["aug"] - test_acc["frozen"]).mean(),
    "vs_frozen_gain_std": (test_acc["aug"] - test_acc["frozen"]).std(ddof=1),
    "frozen_gain_mean": (test_acc["frozen"] - test_acc["noise"]).mean(),
    "frozen_gain_std": (test_acc["frozen"] - test_acc["noise"]).std(ddof=1),
    "learned": learned_distribution(runs),
    "warmup": args.warmup,
    "warp_init_std": args.warp_std,
    "shift_init_std": args.shift_std,
    "noise_init_std": args.init_noise_std,
    "augmentation_mean_abs_change": np.abs(samples - x[:, None]).mean(),
    "augmentation_sample_std": samples.std(axis=1).mean(),
    "seeds": args.seeds,
    "hyper_steps": args.hyper_steps,
    "train_size": args.train_size,
    "val_size": args.val_size,
    "dataset": args.dataset,
    "runs": runs,
  }
  cli.save_metrics(args.out, result)
  cli.print_summary(
    f"Test accuracy over {args.seeds} seeds ({args.train_size} training, {args.val_size} "
    f"validation, {runs[0]['test_size']} test images; {result['num_hyperparams']:,} "
    "hyperparameters)",
    (
      "seed",
      "learned augmentation",
      "no augmentation",
      f"noise std {args.noise_std:g}",
      "initial augmenter",
      "skipped",
    ),
    [
      (
        r["seed"],
        r["aug_test_acc"],
        r["noaug_test_acc"],
        r["noise_test_acc"],
        r["frozen_test_acc"],
        r["skipped_hyper_steps"],
      )
      for r in runs
    ]
    + [
      (
        stat,
        *(result[f"{name}_test_acc_{stat}"] for name in ("aug", "noaug", "noise", "frozen")),
        "",
      )
      for stat in ("mean", "std")
    ],
  )
  for name, against in (("vs_noise", "noise"), ("vs_frozen", "frozen"), ("frozen", "noise")):
    gain, std = result[f"{name}_gain_mean"], result[f"{name}_gain_std"]
    first = "learned augmentation" if name != "frozen" else "frozen"
    print(
      f"paired gain of the {first} over {against}: {gain:+.4f}"
      f" (two standard errors {2 * std / np.sqrt(args.seeds):.4f})"
    )
  print(f"wrote {args.out}/metrics.json and {args.out}/learned_augmentation.png")
  return result


if __name__ == "__main__":
  main()
