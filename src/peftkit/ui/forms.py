"""Forms built from config dataclasses: one input per field, labelled with the field's name and its
help text, so a method's form comes from its record's config class (through the registry) and no
method is ever written out here. Values go back through the recipe's own checks.

A field whose type is exactly bool gets a checkbox, int or float a number box; every other field
(text, lists, optional values) a text box holding the value as YAML, as a recipe would write it;
an empty box means null (the field's "not set")."""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import Any

from peftkit.config import load_yaml_text

KINDS = ("checkbox", "number", "text")


@dataclass(frozen=True)
class FieldSpec:
    """One input of a form: which config field, which widget, its default and help text."""

    name: str
    kind: str  # one of KINDS
    default: Any  # in the widget's terms: bool, number, or YAML text
    help: str
    integer: bool = False  # a number box for an int field


def _default(field: dataclasses.Field) -> Any:
    """A field's default value (calling its factory)."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def yaml_text(value: Any) -> str:
    """A value as one line of YAML flow text ('' for None), as a text box shows it."""
    if value is None:
        return ""
    if isinstance(value, str):
        # A plain word stays plain; anything YAML would read as another type is quoted.
        return value if load_yaml_text(value, "a value") == value else json.dumps(value)
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value)


def field_specs(config_cls: type) -> list[FieldSpec]:
    """The form of a config dataclass: one spec per field a config is built from."""
    hints = typing.get_type_hints(config_cls)
    specs = []
    for field in dataclasses.fields(config_cls):
        if not field.init:
            continue
        hint, default = hints[field.name], _default(field)
        help_text = field.metadata.get("help", "")
        if hint is bool:
            specs.append(FieldSpec(field.name, "checkbox", bool(default), help_text))
        elif hint in (int, float):
            specs.append(FieldSpec(field.name, "number", default, help_text, hint is int))
        else:
            specs.append(FieldSpec(field.name, "text", yaml_text(default), help_text))
    return specs


def section_values(specs: list[FieldSpec], values: list[Any], where: str) -> dict[str, Any]:
    """The widgets' values as a recipe section: only fields that differ from their default, so
    the recipe the run keeps says what was chosen (the config class fills in the rest)."""
    section: dict[str, Any] = {}
    for spec, value in zip(specs, values, strict=True):
        if spec.kind == "text":
            text = "" if value is None else str(value).strip()
            if text == spec.default:
                continue
            section[spec.name] = load_yaml_text(text, f"{where}.{spec.name}") if text else None
        elif spec.kind == "number":
            if value is None or value == spec.default:
                continue
            section[spec.name] = int(value) if spec.integer and float(value).is_integer() else value
        elif bool(value) != spec.default:
            section[spec.name] = bool(value)
    return section


def method_forms() -> dict[str, list[FieldSpec]]:
    """Every registered method's form, by name, in registry order."""
    from peftkit.registry import METHODS

    return {method.name: field_specs(method.config_cls) for method in METHODS}


def method_descriptions() -> dict[str, str]:
    """Every registered method's one-line description, by name."""
    from peftkit.registry import METHODS

    return {method.name: method.description for method in METHODS}
