"""Tables for the terminal and for docs: one Markdown table writer and one key/value box, used by
every command that prints results (train, compare, estimate, recommend, benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table with columns padded to their widest cell (it prints aligned and pastes
    into docs). A row shorter than the header fills its first cells only (a failure note)."""
    widths = [
        max([len(name), *(len(row[i]) for row in rows if len(row) > i)])
        for i, name in enumerate(header)
    ]

    def line(cells: Sequence[str]) -> str:
        if len(cells) < len(widths):
            return "| " + " | ".join(cells) + " |"
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def key_value_table(rows: Sequence[tuple[str, str]], value_width: int = 30) -> str:
    """Names and values in an aligned two-column box (a run's summary)."""
    width = max(len(name) for name, _ in rows)
    value_width = max(value_width, *(len(value) for _, value in rows))
    line = "+" + "-" * (width + 2) + "+" + "-" * (value_width + 2) + "+"
    body = [f"| {name:<{width}} | {value:<{value_width}} |" for name, value in rows]
    return "\n".join([line, *body, line])
