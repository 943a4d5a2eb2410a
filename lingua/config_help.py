"""`--help` of every command: its config sections read from the config dataclasses themselves.

Each key is listed with its type, the values it accepts (its `RANGES` entry), its default and
the comment that documents it where it is declared (the trailing `# ...` of the field, or a docstring right below it), so the help cannot
drift from the code. `lingua.args.cli_main` prints `config_help(cls)` for `--help` / `-h`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from typing import Any, Literal

from lingua.ranges import ANY_RANGE, range_text, ranges_of

_MISSING = "???"  # OmegaConf's marker of a required value


def field_comments(cls: type) -> dict[str, str]:
    """field name -> its documentation in the class body (and in the dataclass bases): the trailing
    comment of the declaration, else a string literal right after it."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            comments.update(_own_comments(klass))
    return comments


def _own_comments(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # classes built at run time have no source
        return {}
    trailing = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    comments = {}
    for statement, following in zip(body.body, [*body.body[1:], None]):
        if not isinstance(statement, ast.AnnAssign) or not isinstance(statement.target, ast.Name):
            continue
        text = trailing.get(statement.end_lineno or statement.lineno) or trailing.get(statement.lineno)
        if text is None and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
            text = " ".join(following.value.value.split())
        if text:
            comments[statement.target.id] = text
    return comments


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation naming something only imported for type checking
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _union_members(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _nested_class(annotation: Any) -> type | None:
    """The config dataclass a field holds (`X`, `X | None`), or None for a leaf."""
    for member in _union_members(annotation):
        if isinstance(member, type) and dataclasses.is_dataclass(member):
            return member
    return None


def type_name(annotation: Any) -> str:
    """A short readable type: `int`, `float or null`, `one of fail|skip`, `dict[str, float]`."""
    if isinstance(annotation, str):
        return annotation
    members = _union_members(annotation)
    if len(members) > 1:
        named = [type_name(m) for m in members if m is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in members else "")
    if typing.get_origin(annotation) is Literal:
        return "one of " + "|".join(str(choice) for choice in typing.get_args(annotation))
    if typing.get_origin(annotation) is not None:
        return repr(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", repr(annotation))


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return _MISSING


def _render_value(value: Any) -> str:
    if value == _MISSING:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _module_name(cls: type) -> str:
    """Where `cls` is declared (the module name even when it runs as `python -m`)."""
    module = inspect.getmodule(cls)
    spec = getattr(module, "__spec__", None)
    return spec.name if spec is not None and spec.name else cls.__module__


def _entries(cls: type, defaults: Any, prefix: str, derived: dict[str, str], lines: list[str]) -> None:
    """Lines for the fields of `cls`; `defaults` is the section's default instance (a nested
    section's factory may set other values than the class declares), or None."""
    comments = field_comments(cls)
    ranges = ranges_of(cls)
    hints = _hints(cls)
    leaves = [f for f in dataclasses.fields(cls) if _nested_class(hints.get(f.name, f.type)) is None]
    sections = [f for f in dataclasses.fields(cls) if _nested_class(hints.get(f.name, f.type)) is not None]
    for field in leaves:
        key = prefix + field.name
        value = getattr(defaults, field.name) if defaults is not None else _default(field)
        default = f"follows {derived[key]}" if key in derived else _render_value(value)
        spec = ranges.get(field.name, ANY_RANGE)
        accepted = "" if spec == ANY_RANGE else f" ({range_text(spec)})"
        lines.append(f"  {key}: {type_name(hints.get(field.name, field.type))}{accepted} = {default}")
        if field.name in comments:
            lines.append(f"      {comments[field.name]}")
    for field in sections:
        nested = _nested_class(hints.get(field.name, field.type))
        assert nested is not None
        key = prefix + field.name
        section = getattr(defaults, field.name) if defaults is not None else _default(field)
        title = f"[{key}] ({nested.__name__}, {_module_name(nested)}" + ("; null unless set" if section is None else "") + ")"
        lines.append("")
        lines.append(title + (f": {comments[field.name]}" if field.name in comments else ""))
        _entries(nested, section, key + ".", derived, lines)


def config_help(cls: type, usage: str, description: str = "", config_key: str | None = "config") -> str:
    """The help text of a command whose config is `cls`: usage, description, then every key
    (`config_key`: the argument naming a YAML file of values, None when the command has none)."""
    lines = [f"usage: {usage}", ""]
    if description:
        lines += [description.strip(), ""]
    file = f"by the YAML file given as {config_key}=FILE.yaml, then " if config_key else ""
    lines += [
        "Each key is set as key=value (nested: a.b=c). Its value is the default shown here, overridden",
        f"{file}by key=value arguments. print_config=true prints the resolved config and exits.",
        "",
        f"keys ({cls.__name__}, {_module_name(cls)}):",
    ]
    _entries(cls, None, "", dict(getattr(cls, "DERIVED_DEFAULTS", {})), lines)
    return "\n".join(lines) + "\n"
