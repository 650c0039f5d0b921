"""Assembling a configuration: a YAML file, ``--set key.path=value`` overrides, validation.

``load_config(path, overrides)`` reads a YAML file, applies ``key.path=value`` overrides
(the value is parsed as YAML: a scalar, a list ``[a, b]`` or a mapping ``{k: v}``) against
the schema's keys, and validates the result (``validate_config``).
"""

from __future__ import annotations

import os
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from searchd.config.errors import ConfigError, _unwrap
from searchd.config.schema import SearchConfig, _baseline_shorthand, validate_config


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError([f"--set {item!r}: expected key.path=value"])
    key, _, text = item.partition("=")
    parts = [p.strip() for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError([f"--set {item!r}: empty key in {key!r}"])
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError([f"--set {key}: value {text!r} is not valid YAML ({e})"]) from None
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to a raw configuration mapping (in place).

    Every key must exist in the schema; list entries are addressed by index
    (``baselines.0.params.rho=5``); under free-form mappings (``solver.options``) any key goes.
    """
    for item in overrides:
        parts, value = parse_override(item)
        node: Any = raw
        schema: Any = SearchConfig
        for i, part in enumerate(parts):
            here = ".".join(parts[:i]) or "the top level"
            key_path = ".".join(parts[: i + 1])
            if isinstance(schema, type) and issubclass(schema, BaseModel):
                if part not in schema.model_fields:
                    raise ConfigError([
                        f"--set {key_path}: unknown key; allowed keys at {here}: "
                        + ", ".join(schema.model_fields)
                    ])
                child_schema = _unwrap(schema.model_fields[part].annotation)
                index: str | int = part
                if (
                    typing.get_origin(child_schema) is list
                    and isinstance(node, dict)
                    and node.get(part) is None
                    and i < len(parts) - 1
                ):
                    node[part] = _plain_default(schema, part)  # address default entries
            elif typing.get_origin(schema) is list:
                if not part.isdigit() or not isinstance(node, list) or int(part) >= len(node):
                    size = len(node) if isinstance(node, list) else 0
                    entries = f"indices 0..{size - 1}" if size else "no entries"
                    raise ConfigError([
                        f"--set {key_path}: {here} is a list of {size} ({entries}); "
                        f"set the whole list with {here}=[...]"
                    ])
                child_schema = _unwrap(typing.get_args(schema)[0])
                index = int(part)
            elif schema is dict or typing.get_origin(schema) is dict:
                child_schema = Any
                index = part
            else:
                raise ConfigError([f"--set {key_path}: {here} is a value, not a section"])
            if not isinstance(node, (dict, list)) or (isinstance(node, list)
                                                      and isinstance(index, str)):
                raise ConfigError([f"--set {key_path}: {here} is not a section in this file"])
            if i == len(parts) - 1:
                node[index] = value
            else:
                if isinstance(node, dict) and node.get(index) is None:
                    node[index] = {}
                if isinstance(node, list) and isinstance(node[index], str):
                    node[index] = _baseline_shorthand(node[index])  # "- logsnr" entries
                node = node[index]
                schema = child_schema if child_schema is not Any else dict
    return raw


def _plain_default(model: type[BaseModel], name: str) -> Any:
    """A field's default as plain data (so overrides can address its entries)."""
    value = model.model_fields[name].get_default(call_default_factory=True)
    if isinstance(value, list):
        return [v.model_dump() if isinstance(v, BaseModel) else v for v in value]
    return value.model_dump() if isinstance(value, BaseModel) else value


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML file's top-level mapping; unreadable or malformed files raise ConfigError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the configuration ({e.strerror})"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([f"{where}: invalid YAML ({problem})"]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the configuration must be a mapping of sections"])
    return raw


def load_config(
    path: str | os.PathLike[str] | None, overrides: Iterable[str] = ()
) -> SearchConfig:
    """Read a YAML configuration, apply ``--set key.path=value`` overrides, validate.

    ``path=None`` starts from the defaults (``model`` must then come from an override).
    """
    raw = read_yaml(path) if path is not None else {}
    return validate_config(apply_overrides(raw, overrides))
