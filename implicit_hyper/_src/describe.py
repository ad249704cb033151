"""A stable text description of an optax transformation's settings, for fingerprints."""

import numbers

MAX_DEPTH = 8


def describe(obj: object, depth: int = 0) -> str:
  """The factory names and scalar settings found in `obj` and the closures it holds.

  optax keeps an optimiser's settings (a learning rate, Adam's betas) in the closures of
  its `update` function; walking them tells ``optax.sgd(0.1)`` from ``optax.sgd(0.2)`` and
  from ``optax.adam(0.1)``. Arrays are described by shape only, objects by type name.

  Example:
    >>> import optax
    >>> describe(optax.sgd(0.1)) != describe(optax.sgd(0.2))
    True
  """
  if depth > MAX_DEPTH:
    return "..."
  if obj is None or isinstance(obj, (bool, numbers.Number, str)):
    return repr(obj)
  if isinstance(obj, (tuple, list)):
    return "[" + ",".join(describe(o, depth + 1) for o in obj) + "]"
  if isinstance(obj, dict):
    items = sorted(obj.items(), key=lambda kv: str(kv[0]))
    return "{" + ",".join(f"{k}:{describe(v, depth + 1)}" for k, v in items) + "}"
  if callable(obj):
    name = getattr(obj, "__qualname__", type(obj).__name__).split(".<locals>")[0]
    cells = [c.cell_contents for c in getattr(obj, "__closure__", None) or ()]
    cells = [c for c in cells if c is not obj]
    return name + ("(" + ",".join(describe(c, depth + 1) for c in cells) + ")" if cells else "")
  if hasattr(obj, "shape") and hasattr(obj, "dtype"):
    return f"array{tuple(obj.shape)}"
  return type(obj).__name__
