"""The implicit rule, compiled once per computation for eager calls (as in a notebook).

Called eagerly, `jax.grad` through a decorated solver would trace and compile the rule's
linear solve (a `while_loop`, a `custom_linear_solve`) afresh at every call: the
closures it is built from are new each time, so no JAX cache can hit. Here the rule runs
inside one `jax.jit` per distinct computation instead. What makes two calls the same
computation is decided from what they compute, not from which Python function they
came from: the condition is traced at every call (`jax.make_jaxpr`), every array it
closes over is hoisted into an argument, and the printed jaxpr (its operations,
shapes, dtypes and Python constants) is the cache key. So a loss that reads module-level
arrays sees their current values at every call, and one whose Python constants or
shapes change gets a new entry, where `jax.closure_convert`, cached by function object,
would keep those of its first call.

The cached path is taken only when every input is concrete (eager, possibly under
`jax.grad` or `jax.jvp`); under `jit`, `vmap` or `pmap` the enclosing transformation
already compiles the rule once, and the rule is built directly, as it is eagerly under
``on_failure="raise"``. A custom JVP rule inside the loss that reads a changing global
array when it is traced is the one case the printed jaxpr does not tell apart.
"""

import collections
import functools
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jex_core

from implicit_hyper._src import rule
from implicit_hyper._src import trust
from implicit_hyper._src.solvers._base import PyTree
from implicit_hyper._src.solvers._base import SolveInfo

MAX_ENTRIES = 64
_ENTRIES: collections.OrderedDict[Any, Callable[..., PyTree]] = collections.OrderedDict()


def implicit_solution(
  condition: Callable[..., PyTree],
  params: PyTree,
  hparams: PyTree,
  arrays: list[Any],
  *,
  call: str,
  checks: trust.Checks,
  solver: Any,
  symmetric: bool,
  init_params: PyTree | None,
) -> PyTree:
  """`rule.implicit_solution` for ``condition(params, hparams, *arrays)``, closures converted.

  `condition` may close over anything (module-level arrays, tracers of an enclosing
  transformation); its closed-over arrays become inputs of the rule.
  """
  example = (params, hparams, *arrays)
  closed = out_shape = None
  # Under "raise" an eager call keeps the uncompiled path, where the error reaches the
  # caller as a `HypergradientError` rather than wrapped in a `JaxRuntimeError`.
  if checks.on_failure != "raise" and _concrete((example, init_params, jax.tree.leaves(solver))):
    # A fresh function: `make_jaxpr`, like `closure_convert`, caches by function object.
    closed, out_shape = jax.make_jaxpr(lambda *xs: condition(*xs), return_shape=True)(*example)
  if closed is None or not _concrete(closed.consts):
    converted, consts = jax.closure_convert(lambda *xs: condition(*xs), *example)
    return rule.implicit_solution(
      converted,
      params,
      hparams,
      (*arrays, *consts),
      solver=solver,
      symmetric=symmetric,
      report=trust.reporter(call, checks),
      init_params=init_params,
    )
  # One entry per call site too: a warning names the user's line, fixed in the program.
  key = (
    trust._user_location(),
    str(closed.jaxpr),
    jax.tree.structure(example),
    jax.tree.structure(out_shape),
    call,
    checks,
    id(solver),
    symmetric,
    init_params is None,
  )
  entry = _ENTRIES.get(key)
  if entry is None:
    entry = _ENTRIES[key] = _compiled_rule(closed.jaxpr, key, solver)
    while len(_ENTRIES) > MAX_ENTRIES:
      _ENTRIES.popitem(last=False)
  _ENTRIES.move_to_end(key)
  return entry(params, hparams, tuple(arrays), tuple(closed.consts), init_params)


def _compiled_rule(jaxpr: Any, key: tuple[Any, ...], solver: Any) -> Callable[..., PyTree]:
  """The jitted rule for one traced condition; `solver` is held so that its id stays unique."""
  place, _, _, out_tree, call, checks, _, symmetric, _ = key

  @jax.jit
  def run(
    params: PyTree,
    hparams: PyTree,
    arrays: tuple[Any, ...],
    consts: tuple[Any, ...],
    init_params: PyTree | None,
  ) -> PyTree:
    def converted(p: PyTree, h: PyTree, *values: Any) -> PyTree:
      inputs = jax.tree.leaves((p, h, *values[: len(arrays)]))
      out = jax.core.eval_jaxpr(jaxpr, list(values[len(arrays) :]), *inputs)
      return jax.tree.unflatten(out_tree, out)

    def report(info: SolveInfo) -> None:
      if checks.on_failure != "ignore":
        jax.debug.callback(functools.partial(trust._act, call, checks, place), info)

    return rule.implicit_solution(
      converted,
      params,
      hparams,
      (*arrays, *consts),
      solver=solver,
      symmetric=symmetric,
      report=report,
      init_params=init_params,
    )

  return run


def _concrete(tree: PyTree) -> bool:
  """Whether every leaf has a concrete value (eager, or an AD tracer of an eager value)."""
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.core.Tracer):
      try:
        jex_core.concrete_or_error(None, leaf)
      except jax.errors.ConcretizationTypeError:
        return False
  return True
