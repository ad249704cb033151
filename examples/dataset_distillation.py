"""Dataset distillation: learn one training image per class by implicit differentiation.

The ten images (one per class, labels fixed) are the hyperparameters, 640 of them for
8x8 digits. The inner problem trains a classifier on those ten images alone,

    theta*(images) = argmin_theta  mean_i CE(f(theta, image_i), i) + l2/2 ||theta||^2,

and the outer loss is the cross-entropy of f(theta*(images)) on real training images.
`ih.implicit_argmin` gives d(outer)/d(images) through theta* with a CG solve
(Lorraine, Vicol & Duvenaud 2020, section 5.3; Wang et al. 2018 for the task).

"Trained from scratch" means the same for the distilled, the class-mean and the random
real images: from theta = 0 (logreg) or the fixed seeded initialisation (mlp), minimise
the objective above over the ten images, for logreg by Newton's method with CG
directions until the gradient vanishes (the optimum is unique), for the MLP by Adam.

    python examples/dataset_distillation.py [--quick] [--out DIR] [--seed N]
        [--model logreg|mlp] [--dataset digits|mnist|cifar10 --data-dir DIR]
"""

import functools
import time

import common
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import optax.tree_utils as otu

import implicit_hyper as ih

DIGITS_TEST_SIZE = 597  # digits has no official split: 1,200 training and 597 test images


def parse_args(argv=None):
  parser = common.common_args(__doc__.splitlines()[0], datasets=("digits", "mnist", "cifar10"))
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
  data = common.load_dataset(args.dataset, data_dir=args.data_dir, seed=args.seed)
  if data.num_train is None:
    (x_train, y_train), (x_test, y_test) = common.split(data, (None, DIGITS_TEST_SIZE), seed=0)
  else:
    x_train, y_train = data.x[: data.num_train], data.y[: data.num_train]
    x_test, y_test = data.x[data.num_train :], data.y[data.num_train :]
  return x_train, y_train, x_test, y_test


class Distiller:
  """The inner problem of one classifier on ten images, and its from-scratch training."""

  def __init__(self, model, image_shape, *, l2, seed):
    self.model = model
    self.init_params = model.init(jax.random.key(seed), jnp.zeros((1, *image_shape)))
    if isinstance(model, common.MLP) and not model.hidden:
      self.init_params = otu.tree_zeros_like(self.init_params)
    self.convex = not model.hidden
    self.l2 = l2

  def inner_loss(self, params, images, labels):
    logits = self.model.apply(params, images)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return cross_entropy + 0.5 * self.l2 * otu.tree_norm(params, squared=True)

  def minimise(self, params, images, labels, *, iterations):
    """Run the inner optimiser from `params` on the objective over `images`."""
    if self.convex:
      return newton_cg(self.inner_loss, params, images, labels, iterations=iterations)
    return adam_descent(self.inner_loss, params, images, labels, iterations=10 * iterations)

  def accuracy(self, params, x, y):
    return jnp.mean(jnp.argmax(self.model.apply(params, x), axis=-1) == y)

  @functools.partial(jax.jit, static_argnums=0)
  def train_from_scratch(self, images, labels):
    """Returns (params, gradient norm at them) for the classifier trained on `images`."""
    params = self.minimise(self.init_params, images, labels, iterations=40)
    return params, otu.tree_norm(jax.grad(self.inner_loss)(params, images, labels))


def newton_cg(loss, params, images, labels, *, iterations):
  """Newton's method with each step ``H^-1 g`` from 50 CG iterations on Hessian products."""
  newton_direction = ih.CG(steps=50, tol=1e-6)

  def step(_, params):
    gradient = jax.grad(loss)(params, images, labels)
    hessian = ih.hessian_vector_product(loss, params, images, (labels,))
    direction, _ = newton_direction.solve(hessian, gradient)
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

  @ih.implicit_argmin(distiller.inner_loss, solver=ih.CG(steps=50, tol=1e-6))
  def fit(init_params, images, labels):
    # Warm-started from the previous outer step's solution: the optimum is the same.
    return distiller.minimise(init_params, images, labels, iterations=3)

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
  params = distiller.train_from_scratch(images, labels)[0]
  batch_size = min(args.batch_size, len(x_train))
  stream = common.batches(x_train, y_train, batch_size, seed=args.seed)
  losses = []
  for _, (x, y) in zip(common.progress(range(args.steps), desc="distilling"), stream, strict=False):
    images, opt_state, params, loss = step(images, opt_state, params, x, y)
    losses.append(float(loss))
  return images, losses


def evaluate(distiller, images, x_test, y_test):
  """Test accuracy and inner gradient norm of the classifier trained from scratch on images."""
  params, gradient_norm = distiller.train_from_scratch(jnp.asarray(images), jnp.arange(10))
  return float(distiller.accuracy(params, x_test, y_test)), float(gradient_norm)


def random_real_images(x_train, y_train, rng):
  return np.stack([x_train[rng.choice(np.flatnonzero(y_train == c))] for c in range(10)])


def plot_losses(losses, path):
  fig, ax = plt.subplots(figsize=(5, 3.2))
  ax.plot(np.arange(1, len(losses) + 1), losses)
  ax.set_xlabel("outer step")
  ax.set_ylabel("training cross-entropy")
  ax.set_xscale("log")
  ax.set_title("Outer loss of the model trained on the 10 images")
  return common.save_figure(fig, path)


def main(argv=None):
  args = parse_args(argv)
  start = time.perf_counter()
  x_train, y_train, x_test, y_test = load(args)
  image_shape = x_train.shape[1:]
  hidden = (64,) if args.model == "mlp" else ()
  distiller = Distiller(common.MLP(hidden=hidden, outputs=10), image_shape, l2=args.l2, seed=0)

  class_means = np.stack([x_train[y_train == c].mean(axis=0) for c in range(10)])
  rng = np.random.default_rng(args.seed)
  init = rng.normal(0.5, 0.1, size=class_means.shape).astype(np.float32)
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
  common.save_metrics(out, metrics)
  common.image_grid(
    images,
    out / "distilled_images.png",
    titles=[str(c) for c in range(10)],
    suptitle=f"Distilled {args.dataset} images ({args.model}, test acc {distilled_acc:.3f})",
  )
  common.image_grid(class_means, out / "class_means.png", titles=[str(c) for c in range(10)])
  plot_losses(losses, out / "outer_loss.png")
  common.print_summary(
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
