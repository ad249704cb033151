"""Exact solve by materialising the operator: for small problems and tests."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.typing import DTypeLike

from implicit_hyper._src.solvers import _base
from implicit_hyper._src.solvers._base import Matvec
from implicit_hyper._src.solvers._base import PyTree
from implicit_hyper._src.solvers._base import SolveInfo

# Unknowns above which `Direct` refuses a dense solve unless told otherwise.
MAX_SIZE = 10_000
MATRIX_FREE = (
  "use a matrix-free solver instead: ih.CG() (symmetric positive definite, as for "
  "ih.implicit_argmin), ih.MINRES() (symmetric indefinite), ih.BiCGStab() or ih.GMRES() "
  "(any), or ih.Neumann() (the paper's truncated series)"
)


def check_dense_size(n: int, dtype: DTypeLike, max_size: int | None) -> None:
  """Raises when a dense n x n solve is above `max_size` or the device's free memory."""
  matrix_bytes = n * n * jnp.dtype(dtype).itemsize
  needed = 3 * matrix_bytes
  if max_size is not None and n > max_size:
    raise ValueError(
      f"`Direct()` would build a dense {n:,} x {n:,} matrix ({matrix_bytes / 2**30:.3g} GiB "
      f"in {jnp.dtype(dtype).name}, about {needed / 2**30:.3g} GiB with its factors) for "
      f"{n:,} unknowns, above `Direct(max_size=...)` = {max_size:,}; {MATRIX_FREE}; or "
      f"raise the limit: `ih.Direct(max_size={n})`."
    )
  free = _free_device_bytes()
  if free is not None and needed > free:
    raise ValueError(
      f"`Direct()` would need about {needed / 2**30:.3g} GiB for a dense {n:,} x {n:,} solve "
      f"in {jnp.dtype(dtype).name}, more than the {free / 2**30:.3g} GiB free on "
      f"{jax.devices()[0]}; {MATRIX_FREE}."
    )


def _free_device_bytes() -> int | None:
  """Free bytes on the default device, where it reports them (None on CPUs)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # a backend without memory statistics
    return None
  if not stats or "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


@_base.solver_pytree()
class Direct(_base.LinearSolver):
  """Builds the dense matrix of A with n products (`jax.jacfwd`) and solves by LU.

  Costs O(n) products, O(n^2) memory and O(n^3) time for n unknowns: use it as the
  exact reference on problems with up to a few thousand parameters. Works for any
  invertible A, symmetric or not. When LU gives non-finite values (A singular, e.g. a
  parameter that the loss does not use) it falls back to the least-squares solution of
  minimum norm, which is exact whenever b lies in A's range; the residual then says
  whether it does. Half-precision operators are solved in float32.

  It claims the solution up to round-off: a relative residual above ``sqrt(eps)`` of the
  dtype (A singular, or numerically so, and b outside its range) is ``converged=False``.

  A dense solve needs at least three n x n arrays (the identity `jax.jacfwd` pushes
  through, the matrix, its LU factors): above `max_size` unknowns, or above the memory
  the device reports free (``jax.Device.memory_stats``; CPUs report none), the solve is
  refused when it is traced, before anything is compiled, with an error naming the
  matrix-free solvers.

  Args:
    max_size: the most unknowns n to solve densely (None: no limit but the device's
      memory). The default, 10,000, is 0.8 GB per matrix in float64.
    ridge: solve ``(A + ridge I) x = b`` instead.

  Example:
    >>> import jax.numpy as jnp
    >>> x, _, _ = Direct().solve(lambda v: jnp.array([[2.0, 1.0], [0.0, 1.0]]) @ v,
    ...                       jnp.array([3.0, 1.0]))
    >>> x.tolist()
    [1.0, 1.0]
  """

  max_size: int | None = MAX_SIZE

  def __post_init__(self) -> None:
    super().__post_init__()
    if self.max_size is not None:
      _base.check_int("Direct", "max_size", self.max_size, minimum=1)

  def residual_target(self, dtype: DTypeLike) -> float:
    """``sqrt(eps)`` of `dtype` (of float32 for half precision, which is solved in it)."""
    return float(np.sqrt(float(jnp.finfo(jnp.promote_types(dtype, jnp.float32)).eps)))

  def compute(self, matvec: Matvec, b: PyTree, state: Any) -> tuple[PyTree, SolveInfo, Any]:
    flat_b, unravel = ravel_pytree(b)
    check_dense_size(flat_b.size, jnp.promote_types(flat_b.dtype, jnp.float32), self.max_size)
    matrix = jax.jacfwd(lambda v: ravel_pytree(matvec(unravel(v)))[0])(flat_b)
    dtype = jnp.promote_types(flat_b.dtype, jnp.float32)
    matrix, rhs = matrix.astype(dtype), flat_b.astype(dtype)
    lu = jnp.linalg.solve(matrix, rhs)
    flat_x = jax.lax.cond(
      jnp.all(jnp.isfinite(lu)),
      lambda: lu,
      lambda: jnp.linalg.lstsq(matrix, rhs)[0],
    )
    x = unravel(flat_x.astype(flat_b.dtype))
    return x, _base.make_info(x, _base.residual(matvec, x, b), b, flat_b.size), state
