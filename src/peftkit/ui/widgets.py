"""Gradio widgets for the forms of forms.py, and the small pieces every page shares (messages, the
id scheme the browser tests find widgets by)."""

from __future__ import annotations

import re
from typing import Any

import gradio as gr

from peftkit.errors import PeftkitError
from peftkit.ui.forms import FieldSpec, section_values


def widget_id(*parts: str) -> str:
    """An element id from parts: ("method", "lora", "rank") -> "method-lora-rank"."""
    return "-".join(part.replace("_", "-") for part in parts)


def field_widget(spec: FieldSpec, elem_id: str, value: Any = None) -> gr.components.Component:
    """One input for one config field, labelled with its name and help text."""
    value = spec.default if value is None else value
    if spec.kind == "checkbox":
        return gr.Checkbox(value=value, label=spec.name, info=spec.help, elem_id=elem_id)
    if spec.kind == "number":
        return gr.Number(value=value, label=spec.name, info=spec.help, elem_id=elem_id,
                         precision=0 if spec.integer else None)  # fmt: skip
    return gr.Textbox(value=value, label=spec.name, info=spec.help, elem_id=elem_id,
                      placeholder="null (not set)", max_lines=1)  # fmt: skip


def form(
    specs: list[FieldSpec], prefix: str, values: dict[str, Any] | None = None
) -> list[gr.components.Component]:
    """Widgets for a list of field specs (in two columns), in spec order."""
    made: dict[str, gr.components.Component] = {}
    with gr.Row(equal_height=False):
        for half in (specs[0::2], specs[1::2]):
            with gr.Column():
                for spec in half:
                    value = (values or {}).get(spec.name)
                    made[spec.name] = field_widget(spec, widget_id(prefix, spec.name), value)
    return [made[spec.name] for spec in specs]


def read_form(
    specs: list[FieldSpec], widgets: list[Any], data: dict[Any, Any], where: str
) -> dict[str, Any]:
    """A form's values from an event's input dict, as a recipe section (changed fields only)."""
    return section_values(specs, [data[widget] for widget in widgets], where)


def escape_markdown(text: str) -> str:
    """Text shown verbatim in a Markdown widget (paths and names keep their _ and *)."""
    return re.sub(r"([\\`*_{}\[\]<>()#+!|~-])", r"\\\1", text)


def error_text(error: Exception) -> str:
    """A peftkit error as the page shows it: the same words as the CLI's one line."""
    return f"**peftkit: error:** {escape_markdown(str(error))}"


def error_line(output: str) -> str:
    """What went wrong, from a failed command's output: its `peftkit: error:` line, else its
    last line (a traceback's exception), whole."""
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("peftkit: error:")]
    return (errors or lines or ["(no output)"])[-1]


def guarded(function: Any, outputs: int = 1) -> Any:
    """Wrap an event handler so a PeftkitError becomes the CLI's message in its first output
    (the others unchanged): the page says what was wrong and keeps working."""

    def handler(*args: Any) -> Any:
        try:
            return function(*args)
        except PeftkitError as error:
            if outputs == 1:
                return error_text(error)
            return (error_text(error), *(gr.update() for _ in range(outputs - 1)))

    handler.__name__ = getattr(function, "__name__", "handler")
    handler.__doc__ = function.__doc__
    return handler
