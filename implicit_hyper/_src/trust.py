"""When a hypergradient can be trusted: the checks, the policies, and a record of every solve.

A decorated inner solver claims that it returned a solution. The backward pass checks
that claim (stationarity), the linear solve (divergence, negative curvature, a solve
that missed its solver's tolerance, and the user's stricter `tol`), and acts by a
policy: warn, raise, or ignore. The checks run on traced values and reach the host
through `jax.debug.callback`, so they work eagerly and under `jit`, `vmap` and `pmap`;
`record_solves` collects the `SolveInfo` of every solve for inspection.
"""

import contextlib
import dataclasses
import functools
import os
import sys
import warnings
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any
from typing import NamedTuple

import jax
import numpy as np

from implicit_hyper._src.solvers import _base

POLICIES = ("warn", "raise", "ignore")
# ||F(theta*)|| / max(||A theta*||, ||F(theta_0)||) above this breaks the theorem's premise;
# for a quadratic it is the relative residual of the normal equations. Chosen so that the
# examples' inner solvers (converged to 1e-4 or better) pass and a few gradient steps fail.
DEFAULT_STATIONARITY_TOL = 1e-2

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RECORDERS: list[list["SolveRecord"]] = []


class HypergradientWarning(RuntimeWarning):
  """Issued when a hypergradient is not to be trusted (see `SolveInfo` for the reasons)."""


class HypergradientError(FloatingPointError):
  """Raised by the ``"raise"`` policy when a hypergradient is not to be trusted."""


class SolveRecord(NamedTuple):
  """One solve seen by `record_solves`: which call, its `SolveInfo` (NumPy), where from."""

  call: str
  info: _base.SolveInfo
  location: str
  failures: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Checks:
  """What makes a hypergradient untrustworthy, and what to do then.

  Attributes:
    on_failure: "warn" (a `HypergradientWarning` pointing at the user's call), "raise"
      (a `HypergradientError`; under `jax.jit` JAX re-raises it as a runtime error that
      carries its message), or "ignore".
    tol: also flag a backward solve whose relative residual exceeds this, a threshold
      stricter than the solver's own (None: only what `unconverged` flags).
    stationarity_tol: flag an inner solution whose relative stationarity exceeds this
      (None: do not check).
    curvature: flag negative curvature seen by the solver (a claimed minimum that is
      none); off where the point is an iterate of training by design (`hypergrad`).
    unconverged: flag a solve whose `SolveInfo.converged` is False: one that missed
      what its solver claims (`LinearSolver.residual_target`: a Krylov solver's `tol`,
      round-off for `ih.Direct`; nothing but finiteness for a truncated Neumann series).
      On for the decorators, whose backward solve is meant to be the solution; off for
      `hypergrad` and the bilevel loop, where a truncated or warm-started solve at an
      iterate of training is the method (Algorithm 1, SOBA, AmIGO) and `SolveInfo`
      reports it.
  """

  on_failure: str = "warn"
  tol: float | None = None
  stationarity_tol: float | None = DEFAULT_STATIONARITY_TOL
  curvature: bool = True
  unconverged: bool = True

  def validate(self, call: str) -> "Checks":
    if self.on_failure not in POLICIES:
      raise ValueError(
        f"`{call}(on_failure=...)` must be one of {POLICIES}, got {self.on_failure!r}."
      )
    for name in ("tol", "stationarity_tol"):
      value = getattr(self, name)
      if value is not None:
        _base.check_nonnegative(call, name, value)
    return self


def failures(info: _base.SolveInfo, checks: Checks) -> tuple[str, ...]:
  """The reasons, in words, why a solve with this (host) `info` is not to be trusted."""
  reasons = []
  residual = np.max(info.residual_norm)
  if np.any(info.diverged):
    reasons.append(f"the linear solve diverged or is not finite (relative residual {residual:.3g})")
  if checks.curvature and np.any(info.negative_curvature):
    reasons.append(
      "the Hessian has negative curvature at the inner solution, which is then no strict "
      "minimum (solve the inner problem closer to a minimum, add a `ridge`, or use ih.MINRES)"
    )
  missed = not np.all(info.converged) and not np.any(info.diverged)
  if checks.unconverged and missed:
    reasons.append(
      f"the linear solve did not converge to its solver's tolerance: relative residual "
      f"{residual:.3g} after {int(np.max(info.num_steps))} steps (give a Krylov solver more "
      "steps, e.g. `solver=ih.CG(steps=200)`, a preconditioner or a `tol` it can reach; a "
      "residual that stays up with more steps, or one from `ih.Direct`, means that "
      "dF/dparams is singular or nearly so, where the derivative does not exist)"
    )
  elif checks.tol is not None and not np.all(residual <= checks.tol):
    reasons.append(f"the linear solve did not converge: relative residual {residual:.3g} > tol")
  stationarity = np.asarray(info.stationarity)
  if checks.stationarity_tol is not None and np.any(stationarity > checks.stationarity_tol):
    reasons.append(
      f"the inner solver's output is not a solution: relative stationarity "
      f"{np.nanmax(stationarity):.3g} > {checks.stationarity_tol:g} (the theorem holds at a "
      "stationary point; run the inner solver longer (under `jax.jit`, write a long loop as "
      "`jax.lax.fori_loop` or `scan`: a Python `for` loop is unrolled, and compiles in time "
      "growing with its number of steps), or for a non-smooth problem "
      "differentiate a proximal-gradient fixed point with `ih.implicit_fixed_point`; or the "
      "loss takes its arguments in the wrong order: it must be `loss(params, hparams, "
      "...)`, params first, then hparams)"
    )
  return tuple(reasons)


def reporter(call: str, checks: Checks) -> Callable[[_base.SolveInfo], None]:
  """``report(info)``: checks a traced `SolveInfo` on the host and acts by `checks`."""
  if checks.on_failure == "ignore":
    return lambda info: None  # no host callback in the compiled program
  location = _user_location()

  def report(info: _base.SolveInfo) -> None:
    if _exporting():
      raise ValueError(
        f"`{call}(on_failure={checks.on_failure!r})` checks every hypergradient on the host "
        "(a `jax.debug.callback`), which `jax.export` cannot serialise. To export, pass "
        f'`{call}(..., on_failure="ignore")`: the exported function computes the same '
        "hypergradient without the checks (check it first, e.g. under `ih.record_solves` "
        'or with `ih.hypergrad_with_info`). Unexported, "warn" keeps the warnings and '
        '"raise" the errors.'
      )
    jax.debug.callback(functools.partial(_act, call, checks, location), info)

  return report


def _exporting() -> bool:
  """Whether this trace is `jax.export.export`'s (which rejects host callbacks)."""
  frame: Any = sys._getframe(1)
  export_file = os.path.join("jax", "_src", "export", "_export.py")
  while frame is not None:
    if frame.f_code.co_name == "do_export" and frame.f_code.co_filename.endswith(export_file):
      return True
    frame = frame.f_back
  return False


@contextlib.contextmanager
def record_solves() -> Iterator[list[SolveRecord]]:
  """Collects a `SolveRecord` for every implicit solve run inside the block.

  Works eagerly and under `jax.jit` (records arrive when the compiled code runs). Solves
  under ``on_failure="ignore"`` are not recorded: that policy compiles no host callback.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import implicit_hyper as ih
    >>> loss = lambda w, lam: 0.5 * jnp.sum((w - 1.0) ** 2) + 0.5 * lam * jnp.sum(w**2)
    >>> exact = lambda w0, lam: jnp.full(2, 1.0 / (1.0 + lam))
    >>> solve = ih.implicit_argmin(loss, solver=ih.CG(steps=5))(exact)
    >>> with ih.record_solves() as records:
    ...   _ = jax.grad(lambda lam: jnp.sum(solve(jnp.zeros(2), lam)))(1.0)
    >>> [(r.call, float(r.info.residual_norm), r.failures) for r in records]
    [('implicit_argmin', 0.0, ())]
  """
  records: list[SolveRecord] = []
  _RECORDERS.append(records)
  try:
    yield records
  finally:
    jax.effects_barrier()  # callbacks of compiled code still running land in this block
    _RECORDERS.remove(records)


def _act(call: str, checks: Checks, location: tuple[str, int], info: _base.SolveInfo) -> None:
  info = jax.tree.map(np.asarray, info)
  reasons = failures(info, checks)
  for records in _RECORDERS:
    records.append(SolveRecord(call, info, f"{location[0]}:{location[1]}", reasons))
  if not reasons or checks.on_failure == "ignore":
    return
  message = f"{call}: the hypergradient is not to be trusted: " + "; ".join(reasons) + "."
  if checks.on_failure == "raise":
    raise HypergradientError(message)
  # `warn_explicit` with a fresh registry: every occurrence is shown, attributed to the
  # line of the user's code that called the library (not to JAX's callback machinery).
  filename, lineno = location
  warnings.warn_explicit(message, HypergradientWarning, filename, lineno, registry={})


def _user_location() -> tuple[str, int]:
  """The file and line of the innermost caller outside this package and JAX."""
  frame: Any = sys._getframe(1)
  while frame is not None:
    filename = os.path.abspath(frame.f_code.co_filename)
    inside = filename.startswith(_PACKAGE_DIR) or f"{os.sep}jax{os.sep}" in filename
    if not inside and "functools" not in filename and "contextlib" not in filename:
      return filename, frame.f_lineno
    frame = frame.f_back
  return "<unknown>", 0
