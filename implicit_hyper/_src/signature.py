"""How a decorated solver's call is split: `init_params`, `hparams`, the loss's and the solver's."""

import inspect
from collections.abc import Callable
from typing import Any

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _parameters(fn: Callable[..., Any]) -> list[inspect.Parameter] | None:
  try:
    return list(inspect.signature(fn).parameters.values())
  except (TypeError, ValueError):  # builtins and some C callables have no signature
    return None


def leading_names(fn: Callable[..., Any]) -> tuple[str | None, str | None]:
  """The names of `fn`'s first two parameters where they may be given by keyword."""
  params = _parameters(fn) or []
  names: list[str | None] = []
  for p in params[:2]:
    if p.kind not in _POSITIONAL:
      break
    names.append(p.name if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD else None)
  names += [None] * (2 - len(names))
  return names[0], names[1]


def keyword_filter(fn: Callable[..., Any]) -> Callable[[str], bool]:
  """``accepts(name)``: whether `fn` takes a keyword argument `name` (all, if unknown)."""
  params = _parameters(fn)
  if params is None or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
    return lambda name: True
  names = {p.name for p in params if p.kind != inspect.Parameter.POSITIONAL_ONLY}
  return lambda name: name in names


def bind(
  call: str, names: tuple[str | None, str | None], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, Any, tuple[Any, ...], dict[str, Any]]:
  """``(init_params, hparams, args, kwargs)`` of a call ``solve(*args, **kwargs)``.

  `init_params` and `hparams` are the first two positional arguments, or the keyword
  arguments named as the inner solver's first two parameters (jaxopt's
  ``ridge(init, l2reg=..., data=...)``).
  """
  args, kwargs = tuple(args), dict(kwargs)
  bound = []
  for role, name in zip(("init_params", "hparams"), names, strict=True):
    if args:
      bound.append(args[0])
      args = args[1:]
    elif name is not None and name in kwargs:
      bound.append(kwargs.pop(name))
    else:
      by_name = f", or by keyword as `{name}=` (the inner solver's name for it)" if name else ""
      raise TypeError(
        f"`{call}`: the decorated solver is called as `solve(init_params, hparams, *args, "
        f"**kwargs)`, but `{role}` was not given (positionally{by_name}). For an inner "
        "solver that ignores its starting point, pass None: `solve(None, hparams, x, y)`."
      )
  return bound[0], bound[1], args, kwargs
