"""Dataset distillation: learn one training image per class by implicit differentiation.

The ten images (one per class, labels fixed) are the hyperparameters, 640 of them for
8x8 digits. The inner problem trains a classifier on those ten images alone,

    theta*(images) = argmin_theta  mean_i CE(f(theta, image_i), i) + l2/2 ||theta||^2,

and the outer loss is the cross-entropy of f(theta*(images)) on real training images.
`ih.implicit_argmin` gives d(outer)/d(images) through theta* with a CG solve
(Lorraine, Vicol & Duvenaud 2020; Wang et al. 2018 for the task).

"Trained from scratch" means the same for the distilled, the class-mean and the random
real images (l2 = 0.01 by default): for logreg, from theta = 0, 40 Newton steps with
CG directions, which reach the unique optimum (gradient norm ~1e-7); for the MLP (64
tanh units), 500 full-batch Adam steps from one fixed seeded initialisation.

    python examples/dataset_distillation.py [--quick] [--out DIR] [--seed N]
        [--model logreg|mlp] [--dataset digits|mnist|cifar10 --data-dir DIR]
"""

import functools
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
from ih_examples import models
from ih_examples import plots
from ih_examples import splits

import implicit_hyper as ih

DIGITS_TEST_SIZE = 597  # digits has no official split: 1,200 training and 597 test images


def parse_args(argv=None):
  parser = cli.common_args(__doc__.splitlines()[0], datasets=("digits", "mnist", "cifar10"))
  parser.add_argument("--model", default="logreg", choices=("logreg", "mlp"))
  parser.add_argument("--steps", type=int, default=None, help="outer Adam steps")
  parser.add_argument("--lr", type=float, default=0.03, help="outer Adam learning rate")
  parser.add_argument("--l2", type=float, default=1e-2, help="inner weight decay")
  parser.add_argument("--batch-size", type=int, default=1024, help="real images per outer step")
  parser.add_argument("--random-draws", type=int, default=5, help="draws of random real images")
  args = parser.parse_args(argv)
  if args.steps is None:
    args.steps = 60 if args.quick else 600
  return args


def load(args):
  """Return (x_train, y_train, x_test, y_test) as float32 images and int32 labels."""
  data = datasets.load_dataset(args.dataset, data_dir=args.data_dir, seed=args.seed)
  if data.num_train is None:
    (x_train, y_train), (x_test, y_test) = splits.split(data, (None, DIGITS_TEST_SIZE), seed=0)
  else:
    x_train, y_train = data.x[: data.num_train], data.y[: data.num_train]
    x_test, y_test = data.x[data.num_train :], data.y[data.num_train :]
  return x_train, y_train, x_test, y_test


class Distiller:
  """The inner problem of one classifier on ten images, and how it is trained.

  logreg: multinomial logistic regression from zero weights, Newton-CG (convex: the
  optimum is unique, so warm starts reach the same one). mlp: one hidden layer of 64
  tanh units (smooth, so its Hessian is defined everywhere) from a fixed seeded
  initialisation, full-batch Adam; its optimum depends on where training starts, so
  every fit starts from that same initialisation. `hessian_solver` is the CG solve of
  the hypergradient's backward pass.
  """

  def __init__(self, model_name, image_shape, *, l2, seed=0):
    self.convex = model_name == "logreg"
    hidden = () if self.convex else (64,)
    self.model = models.MLP(hidden=hidden, outputs=10, activation=nn.tanh)
    self.init_params = self.model.init(jax.random.key(seed), jnp.zeros((1, *image_shape)))
    if self.convex:
      self.init_params = otu.tree_zeros_like(self.init_params)
    self.l2 = l2
    # Where Adam stops, the MLP's Hessian can have small negative eigenvalues: a ridge
    # keeps CG well defined, at the price of a damped hypergradient.
    self.hessian_solver = ih.CG(steps=50, tol=1e-6, ridge=0.0 if self.convex else 0.1)

  def inner_loss(self, params, images, labels):
    logits = self.model.apply(params, images)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return cross_entropy + 0.5 * self.l2 * otu.tree_norm(params, squared=True)

  def train_from_scratch(self, images, labels):
    if self.convex:
      return newton_cg(self.inner_loss, self.init_params, images, labels, iterations=40)
    return adam_descent(self.inner_loss, self.init_params, images, labels, iterations=500)

  def refit(self, previous_params, images, labels):
    """Train on slightly changed images, warm-started from `previous_params` when convex."""
    if self.convex:
      return newton_cg(self.inner_loss, previous_params, images, labels, iterations=3)
    return self.train_from_scratch(images, labels)

  def accuracy(self, params, x, y):
    return jnp.mean(jnp.argmax(self.model.apply(params, x), axis=-1) == y)

  @functools.partial(jax.jit, static_argnums=0)
  def evaluate(self, images, x_test, y_test):
    """Test accuracy and final inner gradient norm of a classifier trained on `images`."""
    labels = jnp.arange(len(images))
    params = self.train_from_scratch(images, labels)
    gradient_norm = otu.tree_norm(jax.grad(self.inner_loss)(params, images, labels))
    return self.accuracy(params, x_test, y_test), gradient_norm


def newton_cg(loss, params, images, labels, *, iterations):
  """Newton's method with each step ``H^-1 g`` from 50 CG iterations on Hessian products."""
  newton_direction = ih.CG(steps=50, tol=1e-6)

  def step(_, params):
    gradient = jax.grad(loss)(params, images, labels)
    hessian = ih.hessian_vector_product(loss, params, images, (labels,))
    direction, _, _ = newton_direction.solve(hessian, gradient)
    return otu.tree_sub(params, direction)

  return jax.lax.fori_loop(0, iterations, step, params)


def adam_descent(loss, params, images, labels, *, iterations, learning_rate=1e-2):
  """Full-batch Adam for a fixed number of steps: the MLP's inner problem is not convex."""
  optimiser = optax.adam(learning_rate)

  def step(_, carry):
    params, state = carry
    updates, state = optimiser.update(jax.grad(loss)(params, images, labels), state)
    return optax.apply_updates(params, updates), state

  return jax.lax.fori_loop(0, iterations, step, (params, optimiser.init(params)))[0]


def distill(distiller, images, x_train, y_train, args):
  """Learn the images by Adam on the hypergradient; return (images, outer losses)."""
  labels = jnp.arange(len(images))

  @ih.implicit_argmin(distiller.inner_loss, solver=distiller.hessian_solver)
  def fit(init_params, images, labels):
    return distiller.refit(init_params, images, labels)

  def outer_loss(images, init_params, x, y):
    params = fit(init_params, images, labels)
    logits = distiller.model.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), params

  optimiser = optax.adam(args.lr)

  @jax.jit
  def step(images, opt_state, params, x, y):
    (loss, params), grad = jax.value_and_grad(outer_loss, has_aux=True)(images, params, x, y)
    updates, opt_state = optimiser.update(grad, opt_state)
    return optax.apply_updates(images, updates), opt_state, params, loss

  opt_state = optimiser.init(images)
  params = jax.jit(distiller.train_from_scratch)(images, labels)
  batch_size = min(args.batch_size, len(x_train))
  stream = splits.batches(x_train, y_train, batch_size, seed=args.seed)
  losses = []
  for _, (x, y) in zip(cli.progress(range(args.steps), desc="distilling"), stream, strict=False):
    images, opt_state, params, loss = step(images, opt_state, params, x, y)
    losses.append(float(loss))
  return images, losses


def evaluate(distiller, images, x_test, y_test):
  """Test accuracy and inner gradient norm of the classifier trained from scratch on images."""
  accuracy, gradient_norm = distiller.evaluate(jnp.asarray(images), x_test, y_test)
  return float(accuracy), float(gradient_norm)


def random_real_images(x_train, y_train, rng):
  return np.stack([x_train[rng.choice(np.flatnonzero(y_train == c))] for c in range(10)])


def plot_losses(losses, path):
  fig, ax = plt.subplots(figsize=(5, 3.2))
  ax.plot(np.arange(1, len(losses) + 1), losses)
  ax.set_xlabel("outer step")
  ax.set_ylabel("training cross-entropy")
  ax.set_xscale("log")
  ax.set_title("Outer loss of the model trained on the 10 images")
  return plots.save_figure(fig, path)


def main(argv=None):
  args = parse_args(argv)
  start = time.perf_counter()
  x_train, y_train, x_test, y_test = load(args)
  image_shape = x_train.shape[1:]
  distiller = Distiller(args.model, image_shape, l2=args.l2)

  class_means = np.stack([x_train[y_train == c].mean(axis=0) for c in range(10)])
  rng = np.random.default_rng(args.seed)
  init = rng.normal(0.5, 0.01, size=class_means.shape).astype(np.float32)
  images, losses = distill(distiller, jnp.asarray(init), x_train, y_train, args)

  distilled_acc, distilled_gradient_norm = evaluate(distiller, images, x_test, y_test)
  class_mean_acc, _ = evaluate(distiller, class_means, x_test, y_test)
  random_accs = [
    evaluate(distiller, random_real_images(x_train, y_train, rng), x_test, y_test)[0]
    for _ in range(args.random_draws)
  ]
  metrics = {
    "distilled_test_acc": distilled_acc,
    "class_mean_test_acc": class_mean_acc,
    "random_real_test_acc": float(np.mean(random_accs)),
    "random_real_test_acc_std": float(np.std(random_accs)),
    "final_outer_loss": losses[-1],
    "inner_gradient_norm": distilled_gradient_norm,
    "num_hyperparams": int(np.prod(images.shape)),
    "model": args.model,
    "dataset": args.dataset,
    "steps": args.steps,
    "seconds": time.perf_counter() - start,
  }
  out = args.out
  cli.save_metrics(out, metrics)
  plots.image_grid(
    np.concatenate([np.asarray(images), class_means]),
    out / "distilled_images.png",
    titles=[f"distilled {c}" for c in range(10)] + [f"mean {c}" for c in range(10)],
    suptitle=f"{args.dataset}, {args.model}: distilled images (test acc {distilled_acc:.3f}) "
    f"above class means ({class_mean_acc:.3f})",
  )
  plot_losses(losses, out / "outer_loss.png")
  cli.print_summary(
    f"Dataset distillation on {args.dataset} ({args.model}, {args.steps} outer steps, "
    f"{metrics['seconds']:.0f} s)",
    ("10 training images", "test accuracy"),
    [
      ("distilled", distilled_acc),
      ("class means", class_mean_acc),
      (f"random real (mean of {args.random_draws})", metrics["random_real_test_acc"]),
    ],
  )
  print(f"wrote {out}/metrics.json and PNG figures")
  return metrics


if __name__ == "__main__":
  main()
