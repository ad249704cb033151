"""End to end: Hessian-vector products per hyper step for the same validation loss.

The problem is `examples/overfit_validation.py`'s default: an MLP (two hidden layers of
100) on digits with 50 training and 50 validation images, one weight decay per weight
and bias, ten full-batch Adam steps per hyper step, one Adam step on the log-decays
(`ih.bilevel`, ``hparam_transform="exp"``). `make_losses`, `parse_args` (for the
defaults), `TRAIN_SIZE`, `VALIDATION_SIZE` and the depth (`DEPTHS`) come from the example;
its data and model setup lives inside its `main()`, so it is repeated here with the
same `ih_examples` helpers (`datasets.load_dataset`, `splits.train_validation_test`,
`models.mlp`) and the same seed. One difference: the example's default Neumann series
has 50 terms; the reference here is ``ih.Neumann(steps=20)`` (K = 20, the automatic
step), as the issue asks.

Every solver runs the same number of hyper steps from the same start. The methods are
stepped in turn, one hyper step each per round, so that load from other processes on a
shared machine falls on all of them alike. Per hyper step the script records the
validation loss after the inner updates (`BilevelMetrics.outer_loss`, on the 50
validation images), the wall time of the jitted step (blocked), and the products.

Counting rule (Hessian-vector products of one solve, from the metrics and the solver
state that went into the solve, so a re-estimate after a skipped step is counted):

- `ih.Neumann(steps=K)`: K, plus `estimate_steps` (4) Lanczos products when the step
  is re-estimated (every `refresh_every` = 10 solves, and after a skipped step).
- `ih.CG(steps=K)`: the iterations run (`solver_steps`), plus 1 for the initial residual
  ``b - A x0`` of the warm start (always on by default, so every solve pays it).
- `ih.CG(..., preconditioner=ih.NystromPreconditioner(rank=k, refresh_every=n))`: as
  CG, plus k when the sketch is renewed (every n solves).
- `ih.MINRES(steps=K)`: the iterations run, plus 1 for the reported true residual.
- `ih.Nystrom(rank=k)`: k for the sketch (every solve: ``refresh_every=1``), plus 1 for
  the reported residual.

"Products per hyper step" is the mean over the run. The mixed VJP and the gradients
are the same for every solver and not counted.

    python benchmarks/end_to_end.py [--quick] [--out DIR] [--hyper-steps N]
"""

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import implicit_hyper as ih

sys.path.insert(0, str(Path(__file__).resolve().parent))
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import _common  # noqa: E402
import overfit_validation as example  # noqa: E402
from ih_examples import datasets  # noqa: E402
from ih_examples import models  # noqa: E402
from ih_examples import splits  # noqa: E402

REFERENCE = "Neumann K=20"
PRECONDITIONED = "CG 10 + Nystrom prec. (rank 10, every 10)"
QUICK_SOLVERS = (REFERENCE, PRECONDITIONED, "MINRES 10", "Nystrom rank 20")


def make_solvers(ridge: float, nystrom_ridge: float) -> dict:
  """The solvers compared, by name; the first is the reference."""
  return {
    REFERENCE: ih.Neumann(steps=20),
    "CG 5": ih.CG(steps=5, ridge=ridge),
    "CG 10": ih.CG(steps=10, ridge=ridge),
    "CG 20": ih.CG(steps=20, ridge=ridge),
    PRECONDITIONED: ih.CG(
      steps=10, ridge=ridge, preconditioner=ih.NystromPreconditioner(rank=10, refresh_every=10)
    ),
    "MINRES 10": ih.MINRES(steps=10),
    "MINRES 20": ih.MINRES(steps=20),
    "Nystrom rank 20": ih.Nystrom(rank=20, ridge=nystrom_ridge),
  }


def sketch_products(solver, state) -> int:
  """Products spent before the iterations: the step estimate or sketch due at this solve."""
  if isinstance(solver, ih.Neumann) and solver.alpha is None:
    due = (not np.isfinite(float(state.alpha))) or int(state.age) >= solver.refresh_every
    return solver.estimate_steps if due else 0
  if isinstance(solver, ih.CG) and solver.preconditioner is not None:
    pre = solver.preconditioner
    return pre.rank if int(state.preconditioner.age) >= pre.refresh_every else 0
  if isinstance(solver, ih.Nystrom):
    if state is None:
      return solver.rank
    return solver.rank if int(state.age) >= solver.refresh_every else 0
  return 0


def solve_products(solver, solver_steps: int) -> int:
  """Products of the solve itself, from its reported `num_steps` (module docstring)."""
  if isinstance(solver, ih.Nystrom):
    return 1  # `num_steps` is the rank of the sketch, counted by `sketch_products`.
  if isinstance(solver, ih.MINRES):
    return solver_steps + 1
  if isinstance(solver, ih.CG):
    return solver_steps + int(solver.warm_start)
  return solver_steps


def parse_args(argv=None):
  parser = _common.common_args(__doc__.splitlines()[0])
  parser.add_argument("--hyper-steps", type=int, default=None, help="hyper steps (1000)")
  parser.add_argument("--width", type=int, default=None, help="hidden units per layer (100)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--ridge", type=float, default=1e-2, help="ridge of the CG solves")
  parser.add_argument(
    "--nystrom-ridge", type=float, default=None, help="damping of ih.Nystrom (lambda_max / 100)"
  )
  args = parser.parse_args(argv)
  defaults = {"hyper_steps": 12, "width": 8} if args.quick else {"hyper_steps": 1000}
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  return args


def main(argv=None):
  args = parse_args(argv)
  ex = example.parse_args([])  # the example's defaults
  width = args.width or ex.width
  data = datasets.load_dataset(ex.dataset, data_dir=ex.data_dir, seed=args.seed)
  train, validation, test = splits.train_validation_test(
    data, example.TRAIN_SIZE, example.VALIDATION_SIZE, seed=args.seed
  )
  train, validation, test = jax.device_put((train, validation, test))
  graphdef, params = models.mlp(
    jax.random.key(args.seed), train[0][:1], hidden=(width,) * ex.depth, outputs=data.num_classes
  )
  log_decay = jax.tree.map(lambda w: jnp.full_like(w, np.log(ex.init_decay)), params)
  num_hyperparams = sum(leaf.size for leaf in jax.tree.leaves(log_decay))
  train_loss, validation_loss = example.make_losses(graphdef)
  inner_args = jax.tree.map(lambda a: jnp.broadcast_to(a, (ex.inner_steps, *a.shape)), train)

  nystrom_ridge = args.nystrom_ridge
  if nystrom_ridge is None:
    matvec = ih.hessian_vector_product(train_loss, params, jax.tree.map(jnp.exp, log_decay), train)
    nystrom_ridge = float(ih.max_eigenvalue(matvec, params)) / 100
  solvers = make_solvers(args.ridge, nystrom_ridge)
  if args.quick:  # one solver of each kind: compilation dominates a smoke test
    solvers = {name: solvers[name] for name in QUICK_SOLVERS}

  @jax.jit
  def accuracies(params):
    def accuracy(x, y):
      return jnp.mean(jnp.argmax(nnx.merge(graphdef, params)(x), axis=-1) == y)

    return accuracy(*train), accuracy(*validation), accuracy(*test)

  runs = {}
  for name, solver in solvers.items():
    loop = ih.bilevel(
      train_loss,
      validation_loss,
      optax.adam(ex.inner_lr),
      optax.adam(ex.outer_lr),
      inner_steps=ex.inner_steps,
      solver=solver,
      hparam_transform="exp",
    )
    state = loop.init(params, log_decay)
    step = jax.jit(loop.step)
    jax.block_until_ready(step.lower(state, inner_args, validation).compile())
    runs[name] = {"solver": solver, "state": state, "step": step, "loss": [], "seconds": []}
    runs[name]["products"] = []
  print(
    f"{num_hyperparams:,} hyperparameters, {args.hyper_steps} hyper steps, "
    f"CG ridge {args.ridge:g}, Nystrom ridge {nystrom_ridge:.3g}"
  )

  for _ in range(args.hyper_steps):
    for run in runs.values():
      solver, state = run["solver"], run["state"]
      sketch = sketch_products(solver, state.method_state.solver)
      start = time.perf_counter()
      state, metrics = jax.block_until_ready(run["step"](state, inner_args, validation))
      run["seconds"].append(time.perf_counter() - start)
      run["state"] = state
      run["loss"].append(float(metrics.outer_loss))
      run["products"].append(sketch + solve_products(solver, int(metrics.solver_steps)))

  reference = runs[REFERENCE]
  target = reference["loss"][-1]
  results = {}
  for name, run in runs.items():
    loss = np.asarray(run["loss"])
    reached = np.flatnonzero(loss <= target)
    steps = int(reached[0]) + 1 if reached.size else None
    acc = dict(
      zip(("train", "val", "test"), map(float, accuracies(run["state"].params)), strict=True)
    )
    results[name] = {
      "solver": repr(run["solver"]),
      "products_per_hyper_step": float(np.mean(run["products"])),
      "hyper_steps_to_target": steps,
      "products_to_target": int(np.sum(run["products"][:steps])) if steps else None,
      "seconds_to_target": float(np.sum(run["seconds"][:steps])) if steps else None,
      "seconds_per_hyper_step": float(np.median(run["seconds"])),
      "final_validation_loss": float(loss[-1]),
      "min_validation_loss": float(loss.min()),
      "train_acc": acc["train"],
      "val_acc": acc["val"],
      "test_acc": acc["test"],
      "skipped_hyper_steps": int(run["state"].num_skipped),
      "validation_loss": run["loss"],
      "products": run["products"],
      "seconds": run["seconds"],
    }

  ref_products = results[REFERENCE]["products_to_target"]
  rows = []
  for name, r in results.items():
    reached = r["hyper_steps_to_target"] is not None
    rows.append(
      (
        name,
        f"{r['products_per_hyper_step']:.1f}",
        r["hyper_steps_to_target"] if reached else "not reached",
        f"{r['products_to_target']:,}" if reached else "-",
        f"{r['products_to_target'] / ref_products:.2f}" if reached else "-",
        f"{r['seconds_to_target']:.1f} s" if reached else "-",
        f"{r['final_validation_loss']:.4f}",
        f"{r['val_acc']:.2f} / {r['test_acc']:.3f}",
        r["skipped_hyper_steps"],
      )
    )
  print(
    f"\nTarget: the validation loss {REFERENCE} reaches after {args.hyper_steps} hyper steps, "
    f"{target:.4f}.\n"
  )
  _common.print_table(
    (
      "method",
      "products / hyper step",
      "hyper steps to target",
      "products to target",
      "vs Neumann",
      "wall time to target",
      "final val loss",
      "final val / test acc",
      "skipped",
    ),
    rows,
  )

  payload = {
    "machine": _common.machine(),
    "config": {
      "hyper_steps": args.hyper_steps,
      "width": width,
      "depth": ex.depth,
      "inner_steps": ex.inner_steps,
      "inner_lr": ex.inner_lr,
      "outer_lr": ex.outer_lr,
      "init_decay": ex.init_decay,
      "seed": args.seed,
      "num_hyperparams": num_hyperparams,
      "cg_ridge": args.ridge,
      "nystrom_ridge": nystrom_ridge,
    },
    "target_validation_loss": target,
    "results": results,
  }
  _common.write_json(args.out, "end_to_end", payload)
  plot(results, target, args.out / "end_to_end.png")
  return payload


def plot(results: dict, target: float, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  for name, r in results.items():
    style = {"color": "k", "lw": 2} if name == REFERENCE else {"lw": 1.2}
    ax.plot(np.cumsum(r["products"]), r["validation_loss"], label=name, **style)
  ax.axhline(target, color="k", ls=":", lw=1, label=f"target ({REFERENCE} at its end)")
  ax.set(
    xscale="log",
    yscale="log",
    xlabel="cumulative Hessian-vector products",
    ylabel="validation loss",
    title="overfit_validation: validation loss vs products",
  )
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
