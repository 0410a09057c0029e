"""Loading the configuration: a YAML file, then dotted ``key=value`` overrides, validated.

Precedence: ``key=value`` overrides on the command line > the YAML file > the defaults of
:mod:`evop.config.sections`. Every problem is one line of a :class:`~evop.config.sections.ConfigError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from evop.config.sections import ConfigError, EvoPConfig


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def _yaml_value(raw: str) -> Any:
    """An override's value read as YAML (``0.3``, ``[0,-1]``, ``null``), except where YAML would
    drop a comment: ``output_dir=runs/a #1`` is the text ``runs/a #1``, not ``runs/a``."""
    if not raw.strip():
        return None
    try:
        *tokens, _end = yaml.scan(raw)
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw  # not YAML: the text itself (the field's validation says if that is wrong)
    last = tokens[-1].end_mark.index if tokens else 0
    return raw.strip() if raw[last:].strip() else value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings; values are read as YAML (``0.3``, ``[0,-1]``, ``null``);
    a value YAML would cut at a `` #`` is kept whole, as text."""
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. search.sparsity=0.3")
        key, raw = item.split("=", 1)
        parsed.append((key.strip(), _yaml_value(raw)))
    return parsed


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: ``field.path: reason``."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(config)"
        lines.append(f"{path}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def build_config(data: dict[str, Any] | None = None, overrides: list[str] | None = None) -> EvoPConfig:
    """Validate a config dict plus dotted overrides into an :class:`EvoPConfig`.

    Raises:
        ConfigError: with one ``field.path: reason`` line per problem.
    """
    data = json.loads(json.dumps(data or {}))  # deep copy, plain types only
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    try:
        return EvoPConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> EvoPConfig:
    """Load a YAML config file (optional) and apply dotted ``key=value`` overrides.

    Raises:
        ConfigError: if the file is missing, a directory, not UTF-8 text, empty, or not a YAML
            mapping, or any value is invalid.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a directory: give a YAML file (see configs/)")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}): is it a YAML config?") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is None:
            raise ConfigError(
                f"{path} is empty: nothing to run (leave out --config to run the defaults, "
                "output_dir runs/evop)"
            )
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = loaded
    return build_config(data, overrides)
