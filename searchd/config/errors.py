"""Configuration errors: one line per problem, naming the key, the bad value and what is
allowed (``ConfigError.lines``), and the formatting of pydantic's validation errors."""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A configuration problem; ``lines`` holds one line per problem."""

    def __init__(self, lines: Iterable[str]) -> None:
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))


class FieldError(ValueError):
    """Raised by validators: names the key (relative to the model validated), its value and
    what is allowed, so the formatter can print them on one line."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key} = {value!r}: {allowed}")


# Error messages -------------------------------------------------------------------------------
def _unwrap(annotation: Any) -> Any:
    """The model class (or dict/list marker) behind Optional/Annotated/list annotations."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else annotation
    return annotation


def _model_at(root: type[BaseModel], loc: Iterable[str | int]) -> Any:
    """What the schema holds at ``loc``: a model class, ``dict`` (free-form), or None."""
    node: Any = root
    for part in loc:
        if isinstance(node, type) and issubclass(node, BaseModel):
            if not isinstance(part, str) or part not in node.model_fields:
                return None
            node = _unwrap(node.model_fields[part].annotation)
        elif typing.get_origin(node) is list and isinstance(part, int):
            node = _unwrap(typing.get_args(node)[0])
        elif typing.get_origin(node) is dict or node is dict:
            return dict
        else:
            return None
    if typing.get_origin(node) is dict:
        return dict
    return node


def _allowed_keys(root: type[BaseModel], loc: Iterable[str | int]) -> list[str]:
    node = _model_at(root, loc)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return []


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dotted(loc: Iterable[str | int]) -> str:
    return ".".join(str(p) for p in loc)


def format_validation_error(err: ValidationError, root: type[BaseModel]) -> list[str]:
    """One line per problem: the key path, the bad value, and what is allowed (``root``:
    the model validated, whose keys are listed for an unknown one)."""
    lines: list[str] = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        path = _dotted(loc)
        kind = e["type"]
        value = e.get("input")
        ctx = e.get("ctx") or {}
        exc = ctx.get("error")
        if isinstance(exc, FieldError):
            key = ".".join(p for p in (path, exc.key) if p)
            lines.append(f"{key}: got {_short(exc.value)}; {exc.allowed}")
        elif kind == "extra_forbidden":
            where = _dotted(loc[:-1]) or "the top level"
            keys = ", ".join(_allowed_keys(root, loc[:-1]))
            lines.append(
                f"{path}: unknown key (value {_short(value)}); allowed keys at {where}: {keys}"
            )
        elif kind == "missing":
            lines.append(f"{path}: required key is missing")
        else:
            msg = str(e["msg"]).removeprefix("Value error, ").replace("Input should be", "must be")
            if isinstance(value, Mapping):
                lines.append(f"{path or 'top level'}: {msg}")
            else:
                lines.append(f"{path or 'top level'}: got {_short(value)}; {msg}")
    return lines
