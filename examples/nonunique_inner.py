"""A training loss with many minimisers: what implicit differentiation, BOME and F2SA reach.

The implicit function theorem assumes a unique inner minimiser. Here it has a whole affine
set: over-parameterised least squares, 6 training points and 10 weights,

  L_T(theta, lam) = |X theta - y0 - Z lam|^2 / (2 n),   H = X^T X / n of rank 6 < 10,
  L_V(theta, lam) = |X_v theta - y_v|^2 / (2 m) + nu |lam|^2 / 2,

whose minimisers are S(lam) = {X^+ (y0 + Z lam) + N w}, N a basis of the null space of X.
Gradient descent on L_T from theta_0 keeps the null-space part of theta_0, so it reaches
theta_0's own minimiser P theta_0 + X^+ (y0 + Z lam) (P the projector on the null space).

- `ih.bilevel` with CG (Algorithm 1): H u = grad L_V has no solution (grad L_V has a
  null-space part), CG meets zero curvature, reports `diverged` and `negative_curvature`,
  and the guard skips every hyper step: the hyperparameters never move (flagged, not
  silently wrong). `ih.MINRES` and `ih.Direct` are flagged the same way.
- `ih.bilevel` with a Neumann series is not flagged: the series grows linearly along the
  null space, but the mixed product Z^T X / n annihilates the null space, so the
  hypergradient is the gradient of lam -> L_V(P theta_0 + X^+ y(lam)), the path gradient
  descent actually follows, and the solve residual stays at the null-space share of
  grad L_V. It converges to lam_A(theta_0): a different hyperparameter for every
  initialisation.
- BOME and F2SA solve the value-function form, min over (theta, lam) of L_V subject to
  theta in S(lam): the optimistic solution lam_O, the one whose best minimiser fits the
  validation data best, whatever theta_0.

All three are compared with the closed forms of lam_A and lam_O, from two initialisations.

  python examples/nonunique_inner.py [--quick] [--out DIR]
"""

import argparse
import json
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import implicit_hyper as ih  # noqa: E402

N, D, M, P, NU = 6, 10, 20, 2, 1e-2


def make_problem(seed: int = 0):
  rng = np.random.default_rng(seed)
  x, z, y0 = rng.normal(size=(N, D)), rng.normal(size=(N, P)), rng.normal(size=N)
  x_val, y_val = rng.normal(size=(M, D)), rng.normal(size=M)
  return {k: jnp.asarray(v) for k, v in dict(x=x, z=z, y0=y0, x_val=x_val, y_val=y_val).items()}


def losses(data):
  def inner(theta, lam):
    return 0.5 * jnp.mean((data["x"] @ theta - data["y0"] - data["z"] @ lam) ** 2)

  def outer(theta, lam):
    return 0.5 * jnp.mean((data["x_val"] @ theta - data["y_val"]) ** 2) + 0.5 * NU * lam @ lam

  return inner, outer


def closed_forms(data, theta0):
  """lam_A(theta0), the fixed point of Algorithm 1 from theta0, and the optimistic lam_O."""
  x, z, y0, xv, yv = (np.asarray(data[k]) for k in ("x", "z", "y0", "x_val", "y_val"))
  pinv = np.linalg.pinv(x)
  null = np.linalg.svd(x)[2][N:].T  # D x (D - N)
  projector = null @ null.T
  # theta(lam) = c + pinv Z lam; both problems are ridge regressions in their unknowns.
  c_a = projector @ np.asarray(theta0) + pinv @ y0
  a = xv @ pinv @ z
  lam_a = np.linalg.solve(a.T @ a / M + NU * np.eye(P), a.T @ (yv - xv @ c_a) / M)
  joint = np.concatenate([a, xv @ null], axis=1)  # unknowns (lam, w)
  ridge = np.diag([NU] * P + [0.0] * (D - N))
  solution = np.linalg.solve(joint.T @ joint / M + ridge, joint.T @ (yv - xv @ pinv @ y0) / M)
  return lam_a, solution[:P]


def run(loop, theta0, steps):
  state = loop.init(theta0, jnp.zeros(P))
  step = jax.jit(loop.step)
  for _ in range(steps):
    state, metrics = step(state, (), ())
  return state, metrics


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", type=Path, default=Path("out/nonunique_inner"))
  args = parser.parse_args(argv)
  data = make_problem()
  inner, outer = losses(data)
  rng = np.random.default_rng(1)
  inits = {"zero": jnp.zeros(D), "random": jnp.asarray(rng.normal(size=D))}
  top = float(np.linalg.eigvalsh(np.asarray(data["x"].T @ data["x"]) / N)[-1])
  # (factory, hyper steps): Algorithm 1 with CG and with a Neumann series, BOME, F2SA.
  methods = {
    "bilevel_cg": (
      lambda: ih.bilevel(
        inner, outer, optax.sgd(1 / top), optax.sgd(0.5), inner_steps=20, solver=ih.CG(steps=20)
      ),
      100,
    ),
    "bilevel_neumann": (
      lambda: ih.bilevel(
        inner,
        outer,
        optax.sgd(1 / top),
        optax.sgd(0.5),
        inner_steps=20,
        solver=ih.Neumann(steps=200, alpha=1 / top),
      ),
      1000,
    ),
    "bome": (
      lambda: ih.bome(
        inner, outer, inner_lr=0.5 / top, weights_lr=0.005, outer_lr=0.005, inner_steps=50
      ),
      20000,
    ),
    "f2sa": (
      lambda: ih.f2sa(
        inner, outer, inner_lr=0.5 / top, outer_lr=0.5, penalty_growth=1.0, penalty_max=1000.0
      ),
      20000,
    ),
  }
  results = {}
  for init_name, theta0 in inits.items():
    lam_a, lam_o = closed_forms(data, theta0)
    for name, (make, steps) in methods.items():
      state, metrics = run(make(), theta0, steps // 5 if args.quick else steps)
      lam = np.asarray(state.hparams)
      results[f"{name}/{init_name}"] = {
        "lam": lam.tolist(),
        "distance_to_lam_A": float(np.linalg.norm(lam - lam_a) / np.linalg.norm(lam_a)),
        "distance_to_lam_O": float(np.linalg.norm(lam - lam_o) / np.linalg.norm(lam_o)),
        "residual_norm": float(metrics.residual_norm),
        "num_skipped": int(metrics.num_skipped),
      }
    results[f"lam_A/{init_name}"] = lam_a.tolist()
    results[f"lam_O/{init_name}"] = lam_o.tolist()
  gap = np.linalg.norm(np.subtract(results["lam_A/zero"], results["lam_A/random"]))
  results["lam_A_gap_between_inits"] = float(gap)
  results["quick"] = args.quick
  for key, value in results.items():
    if isinstance(value, dict):
      print(
        f"{key:18s} |lam - lam_A|/|lam_A| = {value['distance_to_lam_A']:.2e}   "
        f"|lam - lam_O|/|lam_O| = {value['distance_to_lam_O']:.2e}   "
        f"last solve residual {value['residual_norm']:.3f}"
      )
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "nonunique_inner.json").write_text(json.dumps(results, indent=2) + "\n")
  print(f"wrote {args.out / 'nonunique_inner.json'}")
  return results


if __name__ == "__main__":
  main()
