"""Lanczos, MINRES, GMRES, Nystrom and Nystrom-preconditioned CG: exactness, rates, state, reuse."""

import dataclasses
import functools
from collections.abc import Callable

import _problems
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import implicit_hyper as ih

N = 8


@dataclasses.dataclass(frozen=True)
class Entry:
  """As in `tests/test_solvers.py`: a factory and what the shared checks may expect."""

  make: Callable[..., ih.LinearSolver]
  tol: float
  symmetric_only: bool = False
  solves_indefinite: bool = False


REGISTRY = {
  "neumann_lanczos": Entry(functools.partial(ih.Neumann, steps=400), 1e-10, symmetric_only=True),
  "minres": Entry(
    functools.partial(ih.MINRES, steps=N, tol=0.0),
    1e-10,
    symmetric_only=True,
    solves_indefinite=True,
  ),
  "gmres": Entry(functools.partial(ih.GMRES, steps=N, tol=0.0), 1e-10, solves_indefinite=True),
  "gmres_restarted": Entry(
    functools.partial(ih.GMRES, steps=40 * N, restart=4, tol=1e-14), 1e-10, solves_indefinite=True
  ),
  "nystrom": Entry(
    functools.partial(ih.Nystrom, rank=N), 1e-10, symmetric_only=True, solves_indefinite=True
  ),
  "nystrom_reused": Entry(
    functools.partial(ih.Nystrom, rank=N, refresh_every=2),
    1e-10,
    symmetric_only=True,
    solves_indefinite=True,
  ),
  "cg_nystrom": Entry(
    functools.partial(
      ih.CG, steps=N, tol=0.0, preconditioner=ih.NystromPreconditioner(rank=3, refresh_every=2)
    ),
    1e-10,
    symmetric_only=True,
  ),
}


def _spd(seed, eigenvalues=None):
  """A symmetric matrix with the given eigenvalues (default: N in [1, 10])."""
  eigenvalues = np.linspace(1.0, 10.0, N) if eigenvalues is None else np.asarray(eigenvalues)
  n = len(eigenvalues)
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
  return jnp.asarray(q @ np.diag(eigenvalues) @ q.T)


def _nonsymmetric(seed, n=N):
  rng = np.random.default_rng(seed)
  return jnp.asarray(5.0 * np.eye(n) + rng.normal(size=(n, n)))


def _b(seed, n=N):
  return jnp.asarray(np.random.default_rng(seed + 100).normal(size=n))


def _relative_error(x, exact):
  return float(jnp.linalg.norm(x - exact) / jnp.linalg.norm(exact))


def _counting(matvec):
  """``(matvec, count)``: `count()` is the number of products run so far, under jit too."""
  calls = []

  def counted(v):
    jax.debug.callback(lambda: calls.append(1))
    return matvec(v)

  return counted, lambda: len(calls)


# The shared checks of `tests/test_solvers.py`, for the solvers of this file.


@pytest.mark.parametrize("name", REGISTRY)
def test_solver_solves_spd_system_under_jit(name):
  entry = REGISTRY[name]
  a, b = _spd(0), _b(0)
  x, info, _ = jax.jit(lambda b: entry.make().solve(lambda v: a @ v, b))(b)
  assert _relative_error(x, jnp.linalg.solve(a, b)) < entry.tol
  assert float(info.residual_norm) < 10 * entry.tol and not bool(info.diverged)
  assert not bool(info.negative_curvature)


@pytest.mark.parametrize("name", [n for n, e in REGISTRY.items() if not e.symmetric_only])
def test_general_solver_solves_nonsymmetric_system(name):
  entry = REGISTRY[name]
  a, b = _nonsymmetric(1), _b(1)
  x, info, _ = entry.make().solve(lambda v: a @ v, b)
  assert _relative_error(x, jnp.linalg.solve(a, b)) < entry.tol
  assert not bool(info.diverged)


@pytest.mark.parametrize("name", REGISTRY)
def test_ridge_solves_shifted_system(name):
  entry = REGISTRY[name]
  a, b = _spd(2) - 0.5 * jnp.eye(N), _b(2)  # eigenvalues [0.5, 9.5]; + ridge 0.5 -> [1, 10]
  x, _, _ = entry.make(ridge=0.5).solve(lambda v: a @ v, b)
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
  xs, infos, _ = jax.vmap(lambda t: entry.make().solve(matvec, t))(trees)
  for i in range(2):
    got = jnp.concatenate([xs["u"][i], xs["v"][i].ravel()])
    assert _relative_error(got, jnp.linalg.solve(a, bs[i])) < entry.tol
  assert infos.diverged.shape == (2,) and not bool(jnp.any(infos.diverged))


@pytest.mark.parametrize("name", REGISTRY)
def test_mixed_float32_and_float64_leaves_keep_their_dtypes(name):
  a = _spd(4)

  def matvec(tree):
    flat = jnp.concatenate([tree["single"].astype(jnp.float64), tree["double"]])
    out = a @ flat
    return {"single": out[:3].astype(jnp.float32), "double": out[3:]}

  b = _b(4)
  tree = {"single": b[:3].astype(jnp.float32), "double": b[3:]}
  solver = REGISTRY[name].make()
  x, info, _ = jax.jit(lambda t: solver.solve(matvec, t, solver.init(t)))(tree)
  assert x["single"].dtype == jnp.float32 and x["double"].dtype == jnp.float64
  got = jnp.concatenate([x["single"].astype(jnp.float64), x["double"]])
  assert _relative_error(got, jnp.linalg.solve(a, b)) < 1e-6  # float32 round-off
  assert not bool(info.diverged)


@pytest.mark.parametrize("name", REGISTRY)
def test_solver_reports_zero_residual_for_zero_rhs(name):
  x, info, _ = REGISTRY[name].make().solve(lambda v: _spd(0) @ v, jnp.zeros(N))
  assert float(jnp.max(jnp.abs(x))) == 0.0 and float(info.residual_norm) == 0.0
  assert not bool(info.diverged)


@pytest.mark.parametrize("name", REGISTRY)
def test_indefinite_system_is_solved_or_reported(name):
  entry = REGISTRY[name]
  a = jnp.diag(jnp.array([-3.0, 1.0, 2.0, 4.0, 5.0, 6.0, 7.0, 25.0]))
  x, info, _ = entry.make().solve(lambda v: a @ v, jnp.ones(N))
  if entry.solves_indefinite:
    assert _relative_error(x, jnp.linalg.solve(a, jnp.ones(N))) < entry.tol
    assert not bool(info.diverged)
  else:
    assert bool(info.diverged) or bool(info.negative_curvature)
  if entry.symmetric_only and name != "cg_nystrom":  # PCG may converge before it meets it
    assert bool(info.negative_curvature)


@pytest.mark.parametrize("name", REGISTRY)
def test_solver_state_threads_through_a_scan_of_solves(name):
  entry = REGISTRY[name]
  solver, a = entry.make(), _spd(5)
  bs = jnp.stack([_b(5), _b(6), _b(6)])

  def solve(state, b):
    x, info, state = solver.solve(lambda v: a @ v, b, state)
    return state, (x, info)

  _, (xs, infos) = jax.lax.scan(solve, solver.init(bs[0]), bs)
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


@pytest.mark.parametrize(
  "solver",
  [ih.MINRES(steps=6), ih.GMRES(steps=6), ih.Nystrom(rank=6, ridge=1e-3), ih.CG(steps=6, tol=0.0)],
  ids=["minres", "gmres", "nystrom", "cg"],
)
def test_hypergradient_matches_direct_solve_on_ridge(solver):
  """n = 6 parameters: each solver is exact at 6 steps or rank 6 (Nystrom: with its ridge)."""
  problem = _problems.Ridge(d=6, seed=4)
  w = problem.argmin(problem.lam)
  hypergradient = lambda solver: _problems.jit_hypergrad_with_info(
    problem.inner_loss,
    problem.outer_loss,
    w,
    problem.lam,
    inner_args=(problem.x, problem.y),
    outer_args=(problem.x_val, problem.y_val),
    solver=solver,
  )
  got, info, _ = hypergradient(solver)
  exact, _, _ = hypergradient(ih.Direct(ridge=solver.ridge))
  assert _problems.relative_error(got, exact) < 1e-8
  assert not bool(info.diverged)


# Lanczos and the automatic Neumann step.


def test_lanczos_ritz_values_lie_in_the_spectrum_and_converge_faster_than_power_iteration():
  eigenvalues = np.linspace(0.01, 10.0, 200)  # no gap: power iteration's worst case
  a = _spd(7, eigenvalues)
  matvec = lambda v: a @ v
  previous = 0.0
  for steps in (2, 4, 8, 16):
    ritz = ih.lanczos(matvec, jnp.zeros(200), steps=steps)
    assert 0.01 - 1e-12 <= float(ritz.smallest) <= float(ritz.largest) <= 10.0 + 1e-12
    assert float(ritz.largest) >= previous  # a larger Krylov space only improves it
    if steps >= 4:  # Zhou & Li's bound holds lambda_max once theta_max starts to converge
      assert float(ritz.largest + ritz.largest_residual) >= 0.99 * 10.0
    previous = float(ritz.largest)
  power = ih.max_eigenvalue(matvec, jnp.zeros(200), steps=16)
  assert 10.0 - previous < 0.5 * (10.0 - float(power))


def test_lanczos_stops_exactly_when_the_krylov_space_is_invariant():
  a = jnp.diag(jnp.array([3.0, 1.0, -0.5]))
  ritz = ih.lanczos(lambda v: a @ v, jnp.zeros(3), steps=50)
  assert int(ritz.num_steps) == 3
  np.testing.assert_allclose([ritz.smallest, ritz.largest], [-0.5, 3.0], rtol=1e-12)
  assert float(ritz.largest_residual) < 1e-12


def test_max_eigenvalue_by_lanczos_and_by_power_iteration_agree():
  a = jnp.diag(jnp.array([-4.0, 1.0, 2.0]))
  for method in ("power", "lanczos"):
    got = ih.max_eigenvalue(lambda v: a @ v, jnp.zeros(3), steps=200, method=method)
    assert abs(float(got) - 4.0) < 1e-9
  with pytest.raises(ValueError, match=r"max_eigenvalue\(method=...\)"):
    ih.max_eigenvalue(lambda v: v, jnp.zeros(2), method="arnoldi")
  with pytest.raises(ValueError, match=r"lanczos\(steps=...\)"):
    ih.lanczos(lambda v: v, jnp.zeros(2), steps=0)


@pytest.mark.parametrize("seed", range(5))
def test_automatic_neumann_step_keeps_alpha_lambda_max_below_two(seed):
  """Over random operators and start vectors: the default 4-step estimate is a safe step."""
  rng = np.random.default_rng(seed)
  eigenvalues = np.concatenate([rng.uniform(0.01, 1.0, 95), rng.uniform(1.0, 30.0, 5)])
  a = _spd(seed, eigenvalues)
  solver = ih.Neumann(steps=5)
  state = solver.init(jnp.zeros(100))
  for _ in range(3):
    state = state._replace(age=jnp.asarray(solver.refresh_every))  # re-estimate every solve
    _, info, state = solver.solve(lambda v: a @ v, _b(seed, 100), state)
    product = float(state.alpha) * eigenvalues.max()
    assert 0.9 <= product < 2.0, product
    assert not bool(info.diverged) and not bool(info.negative_curvature)


def test_neumann_reports_negative_curvature_from_the_smallest_ritz_value():
  indefinite = jnp.diag(jnp.array([-2.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]))
  _, info, state = ih.Neumann(steps=3).solve(lambda v: indefinite @ v, jnp.ones(N))
  assert bool(info.negative_curvature) and float(state.min_eigenvalue) < 0
  _, info, state = ih.Neumann(steps=3).solve(lambda v: _spd(0) @ v, jnp.ones(N))
  assert not bool(info.negative_curvature) and float(state.min_eigenvalue) >= 1.0 - 1e-12
  _, info, _ = ih.Neumann(steps=3, alpha=0.1).solve(lambda v: indefinite @ v, jnp.ones(N))
  assert not bool(info.negative_curvature)  # a fixed step estimates nothing


def test_automatic_neumann_costs_estimate_steps_more_products_only_when_due():
  matvec, count = _counting(lambda v: _spd(0, np.linspace(1.0, 10.0, 50)) @ v)
  solver = ih.Neumann(steps=20, refresh_every=2)
  state = solver.init(jnp.zeros(50))
  solve = jax.jit(lambda b, state: solver.solve(matvec, b, state))
  counts = []
  for _ in range(4):
    _, _, state = jax.block_until_ready(solve(_b(0, 50), state))
    counts.append(count())
  assert np.diff([0, *counts]).tolist() == [24, 20, 24, 20]


# MINRES.


def test_minres_is_exact_after_n_steps_on_a_symmetric_indefinite_system():
  n = 12
  eigenvalues = np.concatenate([np.linspace(-5.0, -0.5, 4), np.linspace(0.5, 20.0, n - 4)])
  a, b = _spd(8, eigenvalues), _b(8, n)
  x, info, _ = ih.MINRES(steps=n, tol=0.0).solve(lambda v: a @ v, b)
  assert _relative_error(x, jnp.linalg.solve(a, b)) < 1e-8
  assert bool(info.negative_curvature) and not bool(info.diverged)


def test_minres_residual_never_grows_and_is_the_true_residual():
  n = 30
  eigenvalues = np.concatenate([np.linspace(-3.0, -0.1, 10), np.geomspace(0.1, 100.0, n - 10)])
  a, b = _spd(9, eigenvalues), _b(9, n)
  residuals = []
  for steps in range(1, n + 1, 3):
    x, info, _ = ih.MINRES(steps=steps, tol=0.0).solve(lambda v: a @ v, b)
    true = float(jnp.linalg.norm(b - a @ x) / jnp.linalg.norm(b))
    assert abs(float(info.residual_norm) - true) < 1e-10
    residuals.append(true)
  assert np.all(np.diff(residuals) <= 1e-12)


def test_minres_matches_cg_residual_bound_on_spd_and_reports_no_negative_curvature():
  a, b = _spd(10, np.geomspace(1.0, 500.0, 40)), _b(10, 40)
  for steps in (5, 10, 20):
    _, minres, _ = ih.MINRES(steps=steps, tol=0.0).solve(lambda v: a @ v, b)
    _, cg, _ = ih.CG(steps=steps, tol=0.0).solve(lambda v: a @ v, b)
    assert float(minres.residual_norm) <= float(cg.residual_norm) + 1e-12
    assert not bool(minres.negative_curvature)


# GMRES.


def test_gmres_is_exact_after_n_steps_on_a_nonsymmetric_system():
  n = 12
  a, b = _nonsymmetric(11, n), _b(11, n)
  x, info, _ = ih.GMRES(steps=n, tol=0.0).solve(lambda v: a @ v, b)
  assert _relative_error(x, jnp.linalg.solve(a, b)) < 1e-8
  assert int(info.num_steps) == n and float(info.residual_norm) < 1e-12


def test_restarted_gmres_residual_never_grows():
  n = 30
  a = 5.0 * jnp.eye(n) + 0.5 * jnp.asarray(np.random.default_rng(12).normal(size=(n, n)))
  b = _b(12, n)
  residuals = [
    float(ih.GMRES(steps=steps, restart=5, tol=0.0).solve(lambda v: a @ v, b)[1].residual_norm)
    for steps in range(5, 61, 5)
  ]
  assert np.all(np.diff(residuals) <= 1e-12) and residuals[-1] < 1e-6


def test_gmres_differentiates_a_nonsymmetric_root_under_implicit_root():
  a = _nonsymmetric(13, 6)
  optimality = lambda x, theta: a @ x - jnp.tanh(theta)

  @ih.implicit_root(optimality, solver=ih.GMRES(steps=6, tol=0.0))
  def root(x0, theta):
    del x0
    return jnp.linalg.solve(a, jnp.tanh(theta))

  theta = _b(13, 6)
  got = jax.jacobian(root, argnums=1)(jnp.zeros(6), theta)
  exact = jnp.linalg.solve(a, jnp.diag(1.0 - jnp.tanh(theta) ** 2))
  np.testing.assert_allclose(got, exact, atol=1e-10)


# Nystrom.


@pytest.mark.parametrize("damping", [0.3, 2.0])
def test_nystrom_at_full_rank_is_the_exact_inverse_of_h_plus_damping(damping):
  n = 20
  eigenvalues = np.concatenate([np.linspace(-1.5, -0.5, 3), np.geomspace(0.1, 50.0, n - 3)])
  h, b = _spd(14, eigenvalues), _b(14, n)
  x, info, _ = ih.Nystrom(rank=n, ridge=damping).solve(lambda v: h @ v, b)
  assert _relative_error(x, jnp.linalg.solve(h + damping * jnp.eye(n), b)) < 1e-10
  assert float(info.residual_norm) < 1e-10
  assert bool(info.negative_curvature) == (damping < 1.5)  # lambda_min(H + rho) < 0


def test_nystrom_is_exact_on_a_low_rank_indefinite_hessian_through_its_damping():
  """A rank-4 indefinite H: a rank >= 4 sketch captures it, and the damping inverts the rest."""
  n, damping = 30, 0.5
  u, _ = np.linalg.qr(np.random.default_rng(15).normal(size=(n, 4)))
  h = jnp.asarray(u @ np.diag([40.0, 5.0, -2.0, -0.2]) @ u.T)
  b = _b(15, n)
  x, info, _ = ih.Nystrom(rank=6, ridge=damping).solve(lambda v: h @ v, b)
  assert _relative_error(x, jnp.linalg.solve(h + damping * jnp.eye(n), b)) < 1e-10
  assert not bool(info.diverged) and not bool(info.negative_curvature)


def test_nystrom_sketch_is_reused_for_refresh_every_solves():
  matvec, count = _counting(lambda v: _spd(16) @ v)
  solver = ih.Nystrom(rank=5, refresh_every=3, ridge=0.1)
  state = solver.init(jnp.zeros(N))
  solve = jax.jit(lambda state: solver.solve(matvec, _b(16), state))
  bases, counts = [], []
  for _ in range(4):
    _, _, state = jax.block_until_ready(solve(state))
    bases.append(np.asarray(state.basis))
    counts.append(count())
  # 5 products for a sketch, 1 for the reported residual.
  assert np.diff([0, *counts]).tolist() == [6, 1, 1, 6]
  np.testing.assert_array_equal(bases[0], bases[1])
  np.testing.assert_array_equal(bases[0], bases[2])
  assert not np.array_equal(bases[0], bases[3]) and int(state.count) == 2


def test_nystrom_rejects_bad_settings_naming_the_argument():
  with pytest.raises(ValueError, match=r"Nystrom\(rank=...\)"):
    ih.Nystrom(rank=0)
  with pytest.raises(ValueError, match=r"NystromPreconditioner\(refresh_every=...\)"):
    ih.NystromPreconditioner(refresh_every=0)
  with pytest.raises(ValueError, match=r"MINRES\(steps=...\)"):
    ih.MINRES(steps=-1)
  with pytest.raises(ValueError, match=r"GMRES\(restart=...\)"):
    ih.GMRES(restart=0)
  with pytest.raises(TypeError, match=r"CG\(preconditioner=...\)"):
    ih.CG(preconditioner="nystrom")


# The Nystrom preconditioner inside CG's state.


def test_preconditioner_is_kept_in_cg_state_and_reused_for_refresh_every_solves():
  matvec, count = _counting(lambda v: _spd(17, np.geomspace(1.0, 500.0, 40)) @ v)
  preconditioner = ih.NystromPreconditioner(rank=10, refresh_every=3)
  solver = ih.CG(steps=5, tol=0.0, warm_start=False, preconditioner=preconditioner)
  state = solver.init(jnp.zeros(40))
  solve = jax.jit(lambda b, state: solver.solve(matvec, b, state))
  sketches, counts = [], []
  for k in range(7):
    _, info, state = jax.block_until_ready(solve(_b(k, 40), state))
    sketches.append(np.asarray(state.preconditioner.basis))
    counts.append(count())
    assert int(info.num_steps) == 5
  assert np.diff([0, *counts]).tolist() == [15, 5, 5, 15, 5, 5, 15]
  for first, last in ((0, 2), (3, 5)):
    for k in range(first + 1, last + 1):
      np.testing.assert_array_equal(sketches[k], sketches[first])
  assert not np.array_equal(sketches[0], sketches[3])
  assert int(state.preconditioner.count) == 3 and int(state.preconditioner.age) == 1


class _DecayingRidge(_problems.Ridge):
  """Ridge whose feature scales decay as 1/j: a spread spectrum, condition number ~500."""

  def __init__(self, n=400, m=100, d=200, seed=0):
    super().__init__(n=n, m=m, d=d, seed=seed)
    scales = jnp.arange(1.0, d + 1.0) ** -1.0
    self.x, self.x_val = self.x * scales, self.x_val * scales
    top = float(jnp.linalg.eigvalsh(self.x.T @ self.x / n)[-1])
    self.lam = jnp.full(d, jnp.log(top / 500.0))


def test_preconditioned_cg_error_at_20_products_is_a_tenth_of_plain_cg_on_ill_conditioned_ridge():
  """20 products per solve: ih.CG(20) against a rank-50 sketch reused over 10 solves + 15 steps."""
  problem = _DecayingRidge()
  eigenvalues = jnp.linalg.eigvalsh(problem.hessian(problem.lam))
  assert 400 < float(eigenvalues[-1] / eigenvalues[0]) < 600
  w, exact = problem.argmin(problem.lam), problem.exact_hypergrad(problem.lam)

  def errors(solver, solves):
    state, out = solver.init(w), []
    for _ in range(solves):
      got, _, state = _problems.jit_hypergrad_with_info(
        problem.inner_loss,
        problem.outer_loss,
        w,
        problem.lam,
        inner_args=(problem.x, problem.y),
        outer_args=(problem.x_val, problem.y_val),
        solver=solver,
        solver_state=state,
      )
      out.append(_problems.relative_error(got, exact))
    return out

  (plain,) = errors(ih.CG(steps=20, tol=0.0, warm_start=False), 1)
  preconditioner = ih.NystromPreconditioner(rank=50, refresh_every=10)
  preconditioned = errors(
    ih.CG(steps=15, tol=0.0, warm_start=False, preconditioner=preconditioner), 10
  )
  assert max(preconditioned) <= 0.1 * plain, (plain, preconditioned)


# The new solvers in the bilevel loop.


@pytest.mark.parametrize(
  "solver",
  [
    ih.MINRES(steps=20, tol=1e-8),
    ih.GMRES(steps=20, tol=1e-8),
    ih.Nystrom(rank=20, refresh_every=5),
    ih.CG(steps=20, tol=1e-8, preconditioner=ih.NystromPreconditioner(rank=10, refresh_every=5)),
  ],
  ids=["minres", "gmres", "nystrom", "cg_nystrom"],
)
def test_bilevel_ridge_decay_converges_with_each_solver(solver):
  rng = np.random.default_rng(0)
  w_true = rng.normal(size=20)
  sample = lambda n: (x := rng.normal(size=(n, 20)), x @ w_true + 2.0 * rng.normal(size=n))
  train, valid = sample(30), sample(200)
  inner = lambda w, decay, x, y: 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * decay * w @ w
  outer = lambda w, decay, x, y: 0.5 * jnp.mean((x @ w - y) ** 2)
  loop = ih.bilevel(
    inner,
    outer,
    optax.sgd(0.2),
    optax.adam(0.05),
    inner_steps=20,
    solver=solver,
    hparam_transform="exp",
  )
  step = jax.jit(loop.step)
  state = loop.init(jnp.zeros(20), jnp.log(3.0))
  inner_args = tuple(np.broadcast_to(a, (20, *a.shape)) for a in train)
  losses = []
  for _ in range(60):
    state, metrics = step(state, inner_args, valid)
    losses.append(float(metrics.outer_loss))
    assert not bool(metrics.skipped)
  assert losses[-1] < 0.9 * losses[0] and int(state.num_skipped) == 0
