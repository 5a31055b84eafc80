"""Config dataclasses from plain dicts, with errors that suggest the nearest key; and the YAML files
those dicts come from (recipes, compare plans), read strictly."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from peftkit.errors import ConfigError

T = TypeVar("T")


def nearest(word: str, choices: typing.Iterable[str]) -> str | None:
    """The closest valid name to a misspelt one, or None if nothing is close."""
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return found[0] if found else None


def unknown_key_message(key: str, valid: typing.Iterable[str], where: str) -> str:
    """The message for an unknown key: names it, suggests the nearest, lists the valid ones."""
    valid = sorted(valid)
    guess = nearest(key, valid)
    hint = f" Did you mean '{guess}'?" if guess else ""
    return f"Unknown key '{key}' in {where}.{hint} Valid keys: {', '.join(valid)}."


def field_help(cls: type) -> dict[str, str]:
    """Each field's help text, from the dataclass field metadata."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _coerce(value: Any, hint: Any, name: str, where: str) -> Any:
    """Convert a YAML value to the annotated type (YAML reads 5e-4 as a string, for one)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, name, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[-1] if errors else f"'{name}' in {where} cannot be None.")
    if origin in (list, tuple):
        if isinstance(value, str | int | float):
            raise ConfigError(f"'{name}' in {where} must be a list, got {value!r}.")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        items = [_coerce(v, item, name, where) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise ConfigError(f"'{name}' in {where} must be true or false, got {value!r}.")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"'{name}' in {where} must be a number, got {value!r}.")
        try:
            as_float = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"'{name}' in {where} must be a number, got {value!r}.") from None
        if not math.isfinite(as_float):  # YAML's .inf and .nan: never a usable setting
            raise ConfigError(f"'{name}' in {where} must be a finite number, got {value!r}.")
        number = hint(value) if not isinstance(value, str) else hint(as_float)
        if hint is int and float(value) != number:
            raise ConfigError(f"'{name}' in {where} must be a whole number, got {value!r}.")
        return number
    if hint is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"'{name}' in {where} must be text, got {value!r}.")
        return str(value)
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value, where=f"{where}.{name}")
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "config") -> T:
    """Build config class `cls` from a dict, refusing unknown keys and converting types."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {data!r}.")
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(unknown_key_message(key, fields, where))
    values = {key: _coerce(value, hints[key], key, where) for key, value in data.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:  # a __post_init__ check: say where it came from
        raise ConfigError(f"{where}: {error}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a plain dict (tuples become lists, for YAML and JSON)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


# YAML files (recipes, compare plans) are read strictly: YAML says a mapping's keys are unique,
# and PyYAML's own loaders silently keep the last of a repeated key.


@functools.cache
def _strict_loader() -> type:
    """A yaml.SafeLoader that refuses a mapping with a repeated key, naming it and its lines."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor` merges defaults that explicit keys may override
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = lines.get(key)
                    lines.setdefault(key, line)
                except TypeError:
                    continue  # an unhashable key: SafeLoader's own error names it
                if first is not None:
                    where = f"on line {line}" if first == line else f"on lines {first} and {line}"
                    raise ConfigError(
                        f"key '{key}' appears twice, {where}; a YAML mapping holds each key "
                        "once: keep one of them."
                    )
            return super().construct_mapping(node, deep)

    return StrictLoader


def load_yaml_text(text: str, where: str) -> Any:
    """Parse YAML text strictly (a repeated key is an error); `where` names it in errors."""
    import yaml

    try:
        return yaml.load(
            text, Loader=_strict_loader()
        )  # a SafeLoader subclass: no arbitrary objects
    except ConfigError as error:  # a repeated key: say in which file or value
        raise ConfigError(f"{where}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{where} is not valid YAML: {error}") from None


def read_yaml_file(path: str | Path, what: str, hint: str = "") -> Any:
    """A YAML file's contents, strictly parsed; a missing path or a folder gets its own message.
    `what` names the file's role ("Recipe"), `hint` says where to find good ones."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder, not a YAML file{hint}.")
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist{hint}.")
    return load_yaml_text(path.read_text(encoding="utf-8"), str(path))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.max_steps=10` -> (["training", "max_steps"], 10); values are read as YAML."""
    if "=" not in text:
        raise ConfigError(f"Override '{text}' must look like section.key=value.")
    path, raw = text.split("=", 1)
    return path.strip().split("."), load_yaml_text(raw, f"override '{text}'")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `a.b=value` override in a recipe dict (before validation)."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for text in overrides:
        keys, value = parse_override(text)
        target = data
        for key in keys[:-1]:
            if key == "method" and isinstance(target.get(key), str):
                target[key] = {"name": target[key]}
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise ConfigError(f"Override '{text}': '{key}' is not a section.")
        target[keys[-1]] = value
    return data
