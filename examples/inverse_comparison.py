"""Inverse-Hessian approximations compared: Identity, Neumann and CG against the exact solve.

The hypergradient needs ``H^-1 v`` (Lorraine, Vicol & Duvenaud 2020, eq. 2; their
figure 4 compares approximations of it). Here a linear regression on scikit-learn's
diabetes set has one weight decay per feature,

    L_T(w, b; h) = 1/2 mean (x w + b - y)^2 + 1/2 sum_j exp(h_j) w_j^2,

and the log decays h are trained jointly with (w, b) to lower the validation loss
(the paper's Algorithm 1: gradient steps on the weights, a hyper step every few
steps). At every hyper step, the hypergradient at the current weights is computed
with `ih.Identity()`, `ih.Neumann(steps=K)` and `ih.CG(steps=K)` and compared with
`ih.Direct()`, the exact solve, by cosine similarity and relative l2 error.

    python examples/inverse_comparison.py [--quick] [--out DIR] [--seed N]
"""

import functools
import time

import jax

jax.config.update("jax_enable_x64", True)  # Errors near 1e-12 need float64 to be seen.

import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import optax.tree_utils as otu  # noqa: E402
from ih_examples import cli  # noqa: E402
from ih_examples import datasets  # noqa: E402
from ih_examples import plots  # noqa: E402
from ih_examples import splits  # noqa: E402

import implicit_hyper as ih  # noqa: E402

NAMED_STEPS = (1, 5, 20)
ALL_STEPS = (1, 2, 3, 5, 10, 20)


def parse_args(argv=None):
  parser = cli.common_args(
    __doc__.splitlines()[0], default_dataset="diabetes", datasets=("diabetes",)
  )
  parser.add_argument("--hyper-steps", type=int, default=None, help="hyper steps")
  parser.add_argument("--inner-steps", type=int, default=10, help="weight steps per hyper step")
  parser.add_argument("--train-size", type=int, default=100)
  parser.add_argument("--val-size", type=int, default=100)
  args = parser.parse_args(argv)
  if args.hyper_steps is None:
    args.hyper_steps = 20 if args.quick else 50
  args.solver_steps = NAMED_STEPS if args.quick else ALL_STEPS
  return args


def approximations(solver_steps, neumann_alpha):
  """The solvers compared with `ih.Direct()`, by name."""
  solvers = {"identity": ih.Identity()}
  solvers.update({f"neumann_{k}": ih.Neumann(steps=k, alpha=neumann_alpha) for k in solver_steps})
  solvers.update({f"cg_{k}": ih.CG(steps=k) for k in solver_steps})
  return solvers


def train_loss(params, log_decay, x, y):
  w, b = params
  residual = x @ w + b - y
  return 0.5 * jnp.mean(residual**2) + 0.5 * jnp.sum(jnp.exp(log_decay) * w**2)


def mse(params, log_decay, x, y):
  del log_decay  # The validation loss depends on the decays only through the weights.
  w, b = params
  return 0.5 * jnp.mean((x @ w + b - y) ** 2)


def cosine(a, b):
  return jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))


@functools.partial(jax.jit, static_argnums=0)
def compare(solver_steps, params, log_decay, train, val):
  """Cosine similarity and relative error of each approximation against the exact one.

  Every Neumann series uses the step ``1 / lambda_max(H)``, as `ih.Neumann()` does by
  default; it is estimated once here rather than by each solver.
  """

  def hypergradient(solver):
    return ih.hypergrad(
      train_loss, mse, params, log_decay, inner_args=train, outer_args=val, solver=solver
    )

  hessian = ih.hessian_vector_product(train_loss, params, log_decay, train)
  neumann_alpha = 1.0 / ih.max_eigenvalue(hessian, params)
  exact = hypergradient(ih.Direct())
  result = {}
  for name, solver in approximations(solver_steps, neumann_alpha).items():
    approx = hypergradient(solver)
    relative_error = jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact)
    result[name] = jnp.stack([cosine(approx, exact), relative_error])
  return result


def train_jointly(args, train, val):
  """Alternate weight and hyper steps; return the final state and the comparisons."""
  num_features = train[0].shape[1]
  params = (np.zeros(num_features), np.zeros(()))
  log_decay = np.full(num_features, np.log(1e-2))
  outer_optimiser = optax.adam(0.05)
  outer_state = outer_optimiser.init(log_decay)
  # Since x^T x / n <= L I, the Hessian is at most diag(L + exp(h)) (and L for the bias):
  # steps of one over that stay stable however large the decays grow.
  data_curvature = np.linalg.eigvalsh(train[0].T @ train[0] / len(train[0]))[-1]

  @jax.jit
  def weight_steps(params, log_decay):
    majoriser = (data_curvature + jnp.exp(log_decay), jnp.maximum(data_curvature, 1.0))

    def step(_, params):
      grad = jax.grad(train_loss)(params, log_decay, *train)
      return jax.tree.map(lambda p, g, m: p - g / m, params, grad, majoriser)

    return jax.lax.fori_loop(0, args.inner_steps, step, params)

  @jax.jit
  def hyper_step(params, log_decay, outer_state):
    grad = ih.hypergrad(
      train_loss, mse, params, log_decay, inner_args=train, outer_args=val, solver=ih.Direct()
    )
    updates, outer_state = outer_optimiser.update(grad, outer_state)
    return optax.apply_updates(log_decay, updates), outer_state

  history = []
  for _ in cli.progress(range(args.hyper_steps), desc="hyper steps"):
    params = weight_steps(params, log_decay)
    history.append(jax.device_get(compare(args.solver_steps, params, log_decay, train, val)))
    log_decay, outer_state = hyper_step(params, log_decay, outer_state)
  stacked = {name: np.stack([h[name] for h in history]) for name in history[0]}
  return params, log_decay, stacked


@jax.jit
def final_losses(params, log_decay, train, val, test):
  return {
    "val_mse": 2 * mse(params, log_decay, *val),
    "test_mse": 2 * mse(params, log_decay, *test),
    "train_gradient_norm": otu.tree_norm(jax.grad(train_loss)(params, log_decay, *train)),
  }


def plot(history, solver_steps, path):
  """Cosine and relative error against hyper step (top) and solver steps (bottom)."""
  fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
  hyper_steps = np.arange(1, len(history["identity"]) + 1)
  colours = {"identity": "black", "neumann": "tab:blue", "cg": "tab:orange"}
  styles = {"identity": ("identity", "black", ":")}
  for family in ("neumann", "cg"):
    for k, style in zip(NAMED_STEPS, (":", "--", "-"), strict=True):
      styles[f"{family}_{k}"] = (f"{family} {k}", colours[family], style)
  for column, label in enumerate(("cosine similarity", "relative l2 error")):
    ax = axes[0, column]
    for name, (legend, colour, style) in styles.items():
      ax.plot(hyper_steps, history[name][:, column], color=colour, linestyle=style, label=legend)
    ax.set_xlabel("hyper step (joint training)")
    ax.set_ylabel(label)
    ax = axes[1, column]
    for family, marker in (("neumann", "o"), ("cg", "s")):
      final = [history[f"{family}_{k}"][-1, column] for k in solver_steps]
      ax.plot(solver_steps, final, marker=marker, color=colours[family], label=family)
    ax.axhline(history["identity"][-1, column], color="black", linestyle=":", label="identity")
    ax.set_xlabel("solver steps K (Hessian-vector products)")
    ax.set_ylabel(f"{label}, last hyper step")
    ax.set_xticks(solver_steps)
  for ax in axes[:, 1]:
    ax.set_yscale("log")
  axes[0, 0].legend(
    fontsize=8, ncol=2, title="identity = neumann 1 = cg 1 in cosine", title_fontsize=8
  )
  axes[1, 0].legend(fontsize=8)
  fig.suptitle("Approximate hypergradients vs ih.Direct() (diabetes, one weight decay per feature)")
  fig.tight_layout()
  return plots.save_figure(fig, path)


def main(argv=None):
  args = parse_args(argv)
  start = time.perf_counter()
  data = datasets.load_dataset(args.dataset, data_dir=args.data_dir, seed=args.seed)
  train, val, test = (
    tuple(a.astype(np.float64) for a in part)
    for part in splits.split(data, (args.train_size, args.val_size, None), seed=args.seed)
  )
  params, log_decay, history = train_jointly(args, train, val)

  metrics = {}
  for name, values in history.items():
    metrics[f"{name}_cosine"], metrics[f"{name}_rel_error"] = values[-1]
  metrics.update(
    num_hyperparams=int(log_decay.size),
    **jax.device_get(final_losses(params, log_decay, train, val, test)),
    hyper_steps=args.hyper_steps,
    seconds=time.perf_counter() - start,
  )
  cli.save_metrics(args.out, metrics)
  plot(history, args.solver_steps, args.out / "inverse_comparison.png")
  names = ["identity"] + [f"{f}_{k}" for f in ("neumann", "cg") for k in NAMED_STEPS]
  cli.print_summary(
    f"Hypergradient vs ih.Direct() after {args.hyper_steps} hyper steps "
    f"(validation MSE {metrics['val_mse']:.4f}, {metrics['seconds']:.0f} s)",
    ("approximation", "cosine", "relative l2 error"),
    [(name, metrics[f"{name}_cosine"], metrics[f"{name}_rel_error"]) for name in names],
  )
  print(f"wrote {args.out}/metrics.json and PNG figures")
  return metrics


if __name__ == "__main__":
  main()
