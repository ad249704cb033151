"""One registry of all linear solvers drives a shared suite: add a solver, add a line."""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import implicit_hyper as ih

N = 8


def scipy_bicgstab(matvec, b):
  """A plain function ``solve(matvec, b) -> x``, as every `solver=` argument accepts."""
  return jax.scipy.sparse.linalg.bicgstab(matvec, b, tol=1e-14, maxiter=4 * N)[0]


@dataclasses.dataclass(frozen=True)
class Entry:
  """A solver factory and what the shared suite may expect of the solvers it makes.

  Attributes:
    make: ``make(**settings)`` -> a solver; it must accept ``ridge=``.
    tol: the relative error reached on the well-conditioned N x N test systems.
    symmetric_only: the solver is valid only for a symmetric operator (and says so
      through `requires_symmetric`, which `ih.implicit_root` checks).
    solves_indefinite: the solver solves an invertible indefinite system to `tol`;
      otherwise it must report such a system as diverged.
  """

  make: Callable[..., ih.LinearSolver]
  tol: float
  symmetric_only: bool = False
  solves_indefinite: bool = False


# Each solver with settings that solve an N x N system with condition number <= 10.
REGISTRY = {
  "neumann_auto": Entry(
    functools.partial(ih.Neumann, steps=400, estimate_steps=100), 1e-10, symmetric_only=True
  ),
  "neumann_fixed": Entry(functools.partial(ih.Neumann, steps=400, alpha=0.09), 1e-10),
  "cg": Entry(functools.partial(ih.CG, steps=N, tol=0.0), 1e-10, symmetric_only=True),
  "cg_cold": Entry(
    functools.partial(ih.CG, steps=N, tol=0.0, warm_start=False), 1e-10, symmetric_only=True
  ),
  "normal_cg": Entry(
    functools.partial(ih.NormalCG, steps=4 * N, tol=0.0), 1e-9, solves_indefinite=True
  ),
  "bicgstab": Entry(
    functools.partial(ih.BiCGStab, steps=4 * N, tol=1e-14), 1e-10, solves_indefinite=True
  ),
  "direct": Entry(ih.Direct, 1e-12, solves_indefinite=True),
  "minres": Entry(
    functools.partial(ih.MINRES, steps=N, tol=0.0),
    1e-10,
    symmetric_only=True,
    solves_indefinite=True,
  ),
  "gmres": Entry(functools.partial(ih.GMRES, steps=N, tol=0.0), 1e-10, solves_indefinite=True),
  "nystrom": Entry(
    functools.partial(ih.Nystrom, rank=N), 1e-10, symmetric_only=True, solves_indefinite=True
  ),
  "function": Entry(
    functools.partial(ih.FunctionSolver, fn=scipy_bicgstab), 1e-10, solves_indefinite=True
  ),
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


def _relative_error(x, exact):
  return float(jnp.linalg.norm(x - exact) / jnp.linalg.norm(exact))


@pytest.mark.parametrize("name", REGISTRY)
def test_solver_solves_spd_system(name):
  entry = REGISTRY[name]
  a, b = _spd(0), _b(0)
  x, info, _ = jax.jit(lambda b: entry.make().solve(lambda v: a @ v, b))(b)
  assert _relative_error(x, jnp.linalg.solve(a, b)) < entry.tol
  assert float(info.residual_norm) < 10 * entry.tol
  assert not bool(info.diverged)


@pytest.mark.parametrize("name", [n for n, e in REGISTRY.items() if not e.symmetric_only])
def test_general_solver_solves_nonsymmetric_system(name):
  entry = REGISTRY[name]
  a, b = _nonsymmetric(1), _b(1)
  x, info, _ = jax.jit(lambda b: entry.make().solve(lambda v: a @ v, b))(b)
  assert _relative_error(x, jnp.linalg.solve(a, b)) < entry.tol
  assert not bool(info.diverged)


@pytest.mark.parametrize("name", REGISTRY)
def test_ridge_solves_shifted_system(name):
  entry = REGISTRY[name]
  a, b = _spd(2) - 0.5 * jnp.eye(N), _b(2)  # eigenvalues [0.5, 9.5]; + ridge 0.5 -> [1, 10]
  x, _, _ = jax.jit(lambda b: entry.make(ridge=0.5).solve(lambda v: a @ v, b))(b)
  assert _relative_error(x, jnp.linalg.solve(a + 0.5 * jnp.eye(N), b)) < entry.tol


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
  xs, infos, _ = jax.jit(jax.vmap(lambda t: entry.make().solve(matvec, t)))(trees)
  for i in range(2):
    got = jnp.concatenate([xs["u"][i], xs["v"][i].ravel()])
    assert _relative_error(got, jnp.linalg.solve(a, bs[i])) < entry.tol
  assert infos.diverged.shape == (2,) and not bool(jnp.any(infos.diverged))


@pytest.mark.parametrize("name", REGISTRY)
def test_solver_reports_zero_residual_for_zero_rhs(name):
  a = _spd(0)
  x, info, _ = jax.jit(lambda b: REGISTRY[name].make().solve(lambda v: a @ v, b))(jnp.zeros(N))
  assert float(jnp.max(jnp.abs(x))) == 0.0 and float(info.residual_norm) == 0.0
  assert not bool(info.diverged)


@pytest.mark.parametrize("name", REGISTRY)
def test_indefinite_system_is_solved_or_reported_diverged_as_declared(name):
  entry = REGISTRY[name]
  a = jnp.diag(jnp.array([-3.0, 1.0, 2.0, 4.0, 5.0, 6.0, 7.0, 25.0]))
  x, info, _ = jax.jit(lambda b: entry.make().solve(lambda v: a @ v, b))(jnp.ones(N))
  if entry.solves_indefinite:
    assert _relative_error(x, jnp.linalg.solve(a, jnp.ones(N))) < entry.tol
    assert not bool(info.diverged)
  else:
    assert bool(info.diverged)


@pytest.mark.parametrize("name", REGISTRY)
def test_solver_state_threads_through_a_scan_of_solves_without_changing_the_answer(name):
  """``init`` / ``solve`` keep one state type (a `lax.scan` carry, as in `ih.bilevel`), and
  what a state carries (a cached step, a warm start) never moves the answer beyond `tol`."""
  entry = REGISTRY[name]
  solver, a = entry.make(), _spd(5)
  bs = jnp.stack([_b(5), _b(6), _b(6)])

  def solve(state, b):
    x, info, state = solver.solve(lambda v: a @ v, b, state)
    return state, (x, info)

  _, (xs, infos) = jax.jit(lambda bs: jax.lax.scan(solve, solver.init(bs[0]), bs))(bs)
  for x, b in zip(xs, bs, strict=True):
    assert _relative_error(x, jnp.linalg.solve(a, b)) < entry.tol
  assert not bool(jnp.any(infos.diverged))


@pytest.mark.parametrize("name", REGISTRY)
def test_solver_is_a_pytree_that_crosses_jit(name):
  entry = REGISTRY[name]
  solver, a, b = entry.make(), _spd(0), _b(0)
  x, _, _ = jax.jit(lambda solver, b: solver.solve(lambda v: a @ v, b))(solver, b)
  assert _relative_error(x, jnp.linalg.solve(a, b)) < entry.tol


@pytest.mark.parametrize("name", REGISTRY)
def test_implicit_root_accepts_exactly_the_general_solvers(name):
  entry = REGISTRY[name]
  solver = entry.make()
  assert solver.requires_symmetric == entry.symmetric_only
  optimality = lambda x, a: x - a
  if entry.symmetric_only:
    with pytest.raises(ValueError, match="symmetric"):
      ih.implicit_root(optimality, solver=solver)
  else:
    ih.implicit_root(optimality, solver=solver)


def test_identity_returns_scaled_rhs():
  x, info, _ = ih.Identity(scale=0.5).solve(lambda v: 2.0 * v, jnp.ones(3))
  np.testing.assert_array_equal(x, 0.5 * jnp.ones(3))
  assert float(info.residual_norm) == 0.0


def test_cg_warm_start_from_solution_needs_no_steps():
  a, b = _spd(0), _b(0)
  exact = jnp.linalg.solve(a, b)
  _, info, _ = ih.CG(steps=N, tol=1e-8).solve(lambda v: a @ v, b, state=exact)
  assert int(info.num_steps) == 0


def test_cg_state_is_its_last_solution_unless_warm_start_is_off():
  a, b = _spd(0), _b(0)
  x, _, state = ih.CG(steps=N, tol=0.0).solve(lambda v: a @ v, b, ih.CG().init(b))
  np.testing.assert_array_equal(state, x)
  np.testing.assert_array_equal(ih.CG().init(b), jnp.zeros(N))
  cold = ih.CG(steps=N, tol=0.0, warm_start=False)
  assert cold.init(b) is None and cold.solve(lambda v: a @ v, b)[2] is None


@pytest.mark.parametrize(
  ("make", "match"),
  [
    (lambda: ih.Neumann(steps=-1), r"Neumann\(steps=...\)"),
    (lambda: ih.Neumann(alpha=0.0), r"Neumann\(alpha=...\)` must be positive"),
    (lambda: ih.Neumann(alpha=-1.0), r"Neumann\(alpha=...\)` must be positive"),
    (lambda: ih.Neumann(estimate_steps=2.5), r"Neumann\(estimate_steps=...\)"),
    (lambda: ih.Neumann(refresh_every=0), r"Neumann\(refresh_every=...\)"),
    (lambda: ih.CG(steps=-1), r"CG\(steps=...\)"),
    (lambda: ih.CG(tol=-1.0), r"CG\(tol=...\)"),
    (lambda: ih.BiCGStab(steps=1.5), r"BiCGStab\(steps=...\)"),
    (lambda: ih.NormalCG(steps=-2), r"NormalCG\(steps=...\)"),
    (lambda: ih.Direct(ridge=-1.0), r"Direct\(ridge=...\)` must be a non-negative number"),
  ],
)
def test_bad_solver_settings_raise_naming_the_argument(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_function_solver_rejects_a_non_callable():
  with pytest.raises(TypeError, match=r"FunctionSolver\(fn=...\)"):
    ih.FunctionSolver(fn=3.0)


def test_solver_options_are_keyword_only():
  with pytest.raises(TypeError):
    ih.Neumann(20)  # noqa
