"""The decorator shared by `implicit_argmin`, `implicit_root` and `implicit_fixed_point`.

It splits a call into the arrays the implicit function theorem differentiates and the
static settings it binds, runs the inner solver on stopped inputs, checks its output,
and hands the solution to the rule (`rule_cache.implicit_solution`).
"""

import functools
from collections.abc import Callable
from typing import Any

import jax

from implicit_hyper._src import differentiable
from implicit_hyper._src import parallel
from implicit_hyper._src import rule
from implicit_hyper._src import rule_cache
from implicit_hyper._src import signature
from implicit_hyper._src import trust
from implicit_hyper._src import validation
from implicit_hyper._src.solvers._base import PyTree


def check_callable(call: str, name: str, fn: object) -> None:
  if not callable(fn):
    raise TypeError(f"`{call}({name}=...)` must be callable, got {fn!r}.")


def decorator(
  call: str,
  user_fn: Callable[..., Any],
  condition: Callable[..., PyTree],
  check: Callable[[PyTree, PyTree, tuple[Any, ...], dict[str, Any]], None],
  solver: Any,
  symmetric: bool,
  has_aux: bool,
  checks: trust.Checks,
) -> Callable[..., Callable[..., Any]]:
  """The decorator shared by the three forms; `condition` is the F whose root is solved.

  `condition` takes the whole params and returns a tree like its floating leaves: the
  other leaves (a PRNG key, a step counter) are constants of the theorem, as in `args`.
  """
  accepts = signature.keyword_filter(user_fn)

  def decorator(inner_solver: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[..., Any]:
    if args or kwargs:
      raise TypeError(
        f"`{call}` was used as `@{call}` without arguments, so the inner solver was taken "
        f"for the loss and the call's arguments reached the decorator. Write "
        f"`@{call}(loss)` above the solver."
      )
    if not callable(inner_solver):
      raise TypeError(f"`{call}(...)` decorates a callable inner solver, got {inner_solver!r}.")
    names = signature.leading_names(inner_solver)

    @functools.wraps(inner_solver)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
      init_params, hparams, args, kwargs = signature.bind(call, names, args, kwargs)
      validation.check_float_tree(call, "hparams", hparams)
      validation.check_real_tree(call, "init_params", init_params)
      # Keywords the user's function does not take are the inner solver's settings alone.
      loss_kwargs = {k: v for k, v in kwargs.items() if accepts(k)}
      if init_params is not None:
        check(init_params, hparams, args, loss_kwargs)
      out = inner_solver(
        *rule.stop_gradient_arrays((init_params, hparams, *args)),
        **rule.stop_gradient_arrays(kwargs),
      )
      params, aux = out if has_aux else (out, None)
      name = "the inner solver's output" + (" params" if has_aux else "")
      if init_params is None:
        check(params, hparams, args, loss_kwargs)
      else:
        validation.check_same_structure(call, name, params, init_params, "`init_params`")
      floating, constant = differentiable.partition(params)
      # Functions in hparams (an equinox Module's callable fields) are bound, not solved for.
      hparams, functions = differentiable.partition(hparams)
      # Static leaves (strings, Python ints) are bound; array leaves become inputs of the
      # rule, with the arrays the condition closes over hoisted after them.
      leaves, treedef = jax.tree.flatten((constant, functions, args, loss_kwargs))
      arrays = [x for x in leaves if rule.is_array(x)]

      def condition_of_arrays(p: PyTree, h: PyTree, *values: Any) -> PyTree:
        it = iter(values)
        c, f, a, kw = jax.tree.unflatten(
          treedef, [next(it) if rule.is_array(x) else x for x in leaves]
        )
        return condition(differentiable.combine(p, c), differentiable.combine(h, f), *a, **kw)

      start = (
        differentiable.zeros_like_floating(params)
        if init_params is None
        else differentiable.partition(init_params)[0]
      )
      what = f"`{call}({getattr(user_fn, '__name__', '...')})`"
      user = functools.partial(user_fn, **loss_kwargs)
      parallel.check_collectives(what, user, params, hparams, *args)
      floating = rule_cache.implicit_solution(
        condition_of_arrays,
        floating,
        hparams,
        arrays,
        call=call,
        checks=checks,
        solver=solver,
        symmetric=symmetric,
        init_params=None if checks.stationarity_tol is None else start,
      )
      params = differentiable.combine(floating, rule.stop_gradient_arrays(constant))
      return (params, rule.stop_gradient_arrays(aux)) if has_aux else params

    return wrapper

  return decorator
