"""One registry of all linear solvers drives a shared suite: add a solver, add a line."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicit_hyper as ih

N = 8


@dataclasses.dataclass(frozen=True)
class Entry:
  solver: ih.LinearSolver
  tol: float  # relative error reached on the well-conditioned test systems
  symmetric_only: bool


# Each solver with settings that solve an N x N system with condition number <= 10.
REGISTRY = {
  "neumann_auto": Entry(ih.Neumann(steps=400, power_iterations=100), 1e-10, True),
  "neumann_fixed": Entry(ih.Neumann(steps=400, alpha=0.09), 1e-10, False),
  "cg": Entry(ih.CG(steps=N, tol=0.0), 1e-10, True),
  "normal_cg": Entry(ih.NormalCG(steps=4 * N, tol=0.0), 1e-9, False),
  "bicgstab": Entry(ih.BiCGStab(steps=4 * N, tol=1e-14), 1e-10, False),
  "direct": Entry(ih.Direct(), 1e-12, False),
}


def _spd(seed):
  """A symmetric matrix with eigenvalues in [1, 10]."""
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(N, N)))
  return jnp.asarray(q @ np.diag(np.linspace(1.0, 10.0, N)) @ q.T)


def _nonsymmetric(seed):
  """A non-symmetric matrix, I-shifted so that alpha = 0.09 Neumann converges."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(5.0 * np.eye(N) + np.triu(rng.normal(size=(N, N)), 1) * 0.3)


def _b(seed):
  return jnp.asarray(np.random.default_rng(seed + 100).normal(size=N))


@pytest.mark.parametrize("name", REGISTRY)
def test_solver_solves_spd_system(name):
  entry = REGISTRY[name]
  a, b = _spd(0), _b(0)
  x, info = jax.jit(lambda b: entry.solver.solve(lambda v: a @ v, b))(b)
  exact = jnp.linalg.solve(a, b)
  assert float(jnp.linalg.norm(x - exact) / jnp.linalg.norm(exact)) < entry.tol
  assert float(info.residual_norm) < 10 * entry.tol
  assert not bool(info.diverged)


@pytest.mark.parametrize("name", [n for n, e in REGISTRY.items() if not e.symmetric_only])
def test_general_solver_solves_nonsymmetric_system(name):
  entry = REGISTRY[name]
  a, b = _nonsymmetric(1), _b(1)
  x, info = entry.solver.solve(lambda v: a @ v, b)
  exact = jnp.linalg.solve(a, b)
  assert float(jnp.linalg.norm(x - exact) / jnp.linalg.norm(exact)) < entry.tol
  assert not bool(info.diverged)


@pytest.mark.parametrize("name", REGISTRY)
def test_ridge_solves_shifted_system(name):
  entry = REGISTRY[name]
  a, b = _spd(2) - 0.5 * jnp.eye(N), _b(2)  # eigenvalues [0.5, 9.5]; + ridge 0.5 -> [1, 10]
  solver = dataclasses.replace(entry.solver, ridge=0.5)
  x, _ = solver.solve(lambda v: a @ v, b)
  exact = jnp.linalg.solve(a + 0.5 * jnp.eye(N), b)
  assert float(jnp.linalg.norm(x - exact) / jnp.linalg.norm(exact)) < entry.tol


@pytest.mark.parametrize("name", REGISTRY)
def test_solver_works_on_pytrees_and_under_vmap(name):
  entry = REGISTRY[name]
  a = _spd(3)

  def matvec(tree):
    flat = jnp.concatenate([tree["u"], tree["v"].ravel()])
    out = a @ flat
    return {"u": out[:2], "v": out[2:].reshape(3, 2)}

  bs = jnp.stack([_b(3), _b(4)])
  trees = {"u": bs[:, :2], "v": bs[:, 2:].reshape(2, 3, 2)}
  xs, infos = jax.vmap(lambda t: entry.solver.solve(matvec, t))(trees)
  for i in range(2):
    got = jnp.concatenate([xs["u"][i], xs["v"][i].ravel()])
    exact = jnp.linalg.solve(a, bs[i])
    assert float(jnp.linalg.norm(got - exact) / jnp.linalg.norm(exact)) < entry.tol
  assert infos.diverged.shape == (2,) and not bool(jnp.any(infos.diverged))


@pytest.mark.parametrize("name", REGISTRY)
def test_solver_reports_zero_residual_for_zero_rhs(name):
  x, info = REGISTRY[name].solver.solve(lambda v: _spd(0) @ v, jnp.zeros(N))
  assert float(jnp.max(jnp.abs(x))) == 0.0 and float(info.residual_norm) == 0.0
  assert not bool(info.diverged)


@pytest.mark.parametrize("name", ["neumann_fixed", "cg", "bicgstab"])
def test_iterative_solver_flags_indefinite_or_divergent_operator(name):
  a = jnp.diag(jnp.array([-3.0, 1.0, 2.0, 4.0, 5.0, 6.0, 7.0, 25.0]))
  _, info = REGISTRY[name].solver.solve(lambda v: a @ v, jnp.ones(N))
  if name == "bicgstab":  # a Krylov solver for general A solves indefinite systems
    assert not bool(info.diverged)
  else:
    assert bool(info.diverged)


def test_identity_returns_scaled_rhs():
  x, info = ih.Identity(scale=0.5).solve(lambda v: 2.0 * v, jnp.ones(3))
  np.testing.assert_array_equal(x, 0.5 * jnp.ones(3))
  assert float(info.residual_norm) == 0.0


def test_cg_warm_start_from_solution_needs_no_steps():
  a, b = _spd(0), _b(0)
  exact = jnp.linalg.solve(a, b)
  _, info = ih.CG(steps=N, tol=1e-8).solve(lambda v: a @ v, b, init=exact)
  assert int(info.num_steps) == 0


@pytest.mark.parametrize(
  ("make", "match"),
  [
    (lambda: ih.Neumann(steps=-1), r"Neumann\(steps=...\)"),
    (lambda: ih.Neumann(alpha=0.0), r"Neumann\(alpha=...\)` must be positive"),
    (lambda: ih.Neumann(alpha=-1.0), r"Neumann\(alpha=...\)` must be positive"),
    (lambda: ih.Neumann(power_iterations=2.5), r"power_iterations"),
    (lambda: ih.CG(steps=-1), r"CG\(steps=...\)"),
    (lambda: ih.CG(tol=-1.0), r"CG\(tol=...\)"),
    (lambda: ih.BiCGStab(steps=1.5), r"BiCGStab\(steps=...\)"),
    (lambda: ih.NormalCG(steps=-2), r"NormalCG\(steps=...\)"),
    (lambda: ih.Direct(ridge=-1.0), r"Direct\(ridge=...\)` must be non-negative"),
  ],
)
def test_bad_solver_settings_raise_naming_the_argument(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_solver_options_are_keyword_only():
  with pytest.raises(TypeError):
    ih.Neumann(20)  # noqa
