"""Griffe extension: reads this project's docstrings the way they are written.

The docstrings follow the Google style with three habits of their own, which the
reference pages render as follows:

- an ``Example:`` section (singular) holds doctests: rendered as an examples section;
- ``.. math::`` blocks and ``:math:`...``` roles hold LaTeX: rendered as math (MathJax,
  through arithmatex);
- solvers are dataclasses made by ``@solver_pytree`` (keyword-only fields): their
  signature is built from the annotated fields, as griffe does for ``@dataclass``.
"""

import re

import griffe

_INLINE_MATH = re.compile(r":math:`([^`]+)`")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", flags=re.M)
_MATH = re.compile(
  r"^(?P<indent>[ \t]*)\.\. math::[ \t]*\n(?P<body>(?:(?P=indent)[ \t]+.*\n?|[ \t]*\n)+)", re.M
)


def _display_math(match: re.Match) -> str:
  indent = match["indent"]
  lines = [line.strip() for line in match["body"].rstrip().splitlines()]
  body = "\n".join(f"{indent}{line}" for line in lines if line)
  return f"{indent}$$\n{body}\n{indent}$$\n\n"


def rewrite(docstring: str) -> str:
  """The docstring with ``Example:`` as ``Examples:`` and RST math as arithmatex math."""
  docstring = _EXAMPLE.sub(r"\1Examples:", docstring)
  return _INLINE_MATH.sub(r"$\1$", _MATH.sub(_display_math, docstring))


def _is_solver_pytree(cls: griffe.Class) -> bool:
  return any(str(d.value).split("(")[0].endswith("solver_pytree") for d in cls.decorators)


def _fields(cls: griffe.Class) -> list[griffe.Parameter]:
  """Keyword-only parameters from the annotated fields of `cls` and its bases, bases first."""
  parameters: dict[str, griffe.Parameter] = {}
  for klass in [*reversed(cls.mro()), cls]:
    for member in klass.members.values():
      if member.is_alias or not member.is_attribute or member.annotation is None:
        continue
      if "instance-attribute" not in member.labels or "property" in member.labels:
        continue  # a ClassVar or a property, not a field
      parameters[member.name] = griffe.Parameter(
        member.name,
        annotation=member.annotation,
        kind=griffe.ParameterKind.keyword_only,
        default=member.value,
      )
  return list(parameters.values())


class ProjectDocstrings(griffe.Extension):
  """Applies `rewrite` to every docstring and builds ``__init__`` for solver classes."""

  def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
    if obj.docstring is not None:
      obj.docstring.value = rewrite(obj.docstring.value)

  def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
    for cls in _classes(pkg):
      if _is_solver_pytree(cls) and "__init__" not in cls.members:
        self_parameter = griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword)
        init = griffe.Function(
          "__init__",
          parent=cls,
          parameters=griffe.Parameters(self_parameter, *_fields(cls)),
          returns="None",
        )
        cls.set_member("__init__", init)


def _classes(module: griffe.Module):
  for member in module.members.values():
    if member.is_alias:
      continue
    if member.is_module:
      yield from _classes(member)
    elif member.is_class:
      yield member
