"""The data preview: the first training rows as the model will see them, made by the task type's
own `prepare` (the code training runs: the prompt format, the chat template, truncation) with the
model's tokenizer, and shown as the tokens decode back to text, the tokens the loss is on marked.
Generic: it reads features (input_ids, labels) and never asks which task type made them."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

from peftkit.recipe import TaskConfig

IGNORED = -100  # the label of a token without loss


@dataclass(frozen=True)
class Shown:
    """One row as the model sees it: its text in pieces, each learned (loss on it) or not."""

    pieces: list[tuple[str, bool]]
    tokens: int
    learned: int
    label: str | None = None  # a classification row's class name

    def text(self) -> str:
        """The whole input as text."""
        return "".join(piece for piece, _ in self.pieces)

    def learned_text(self) -> str:
        """The part the loss is on."""
        return "".join(piece for piece, learned in self.pieces if learned)


def shown_feature(feature: dict[str, Any], tokenizer: Any, labels: list[str]) -> Shown:
    """A feature's tokens decoded back to text in runs of learned and not learned tokens (special
    tokens kept: they are what the model reads)."""
    ids = list(feature["input_ids"])
    targets = feature.get("labels")
    if not isinstance(targets, list):  # one class index for the whole row, or none
        text = tokenizer.decode(ids, skip_special_tokens=False)
        label = labels[targets] if isinstance(targets, int) and labels else None
        return Shown([(text, False)], len(ids), 0, label)
    pieces: list[tuple[str, bool]] = []
    start = 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or (targets[end] != IGNORED) != (targets[start] != IGNORED):
            text = tokenizer.decode(ids[start:end], skip_special_tokens=False)
            pieces.append((text, targets[start] != IGNORED))
            start = end
    learned = sum(target != IGNORED for target in targets)
    return Shown(pieces, len(ids), learned)


def preview_rows(task: dict[str, Any], model: str, count: int = 3) -> list[Shown]:
    """The first `count` training rows of the task's data as its task type prepares them for
    `model` (the recipe's checks and the data's errors are the CLI's)."""
    from peftkit.config import from_dict
    from peftkit.models import load_model
    from peftkit.tasks.types import get_task_type, split_rows

    config = from_dict(TaskConfig, task, where="task")
    task_type = get_task_type(config.type)
    train, held_out = split_rows(config)
    _, tokenizer = load_model(model, config.type)
    data = task_type.prepare(config, tokenizer, train, held_out or train)
    return [shown_feature(f, tokenizer, data.labels) for f in data.train[:count]]


def preview_html(rows: list[Shown]) -> str:
    """The rows as HTML: each input in a box, the learned tokens highlighted."""
    parts = [
        "<p>The first training rows as the model sees them (after the prompt format or chat "
        "template, special tokens shown); <mark>highlighted</mark>: the tokens the loss is on.</p>"
    ]
    for number, row in enumerate(rows, 1):
        body = "".join(
            f"<mark>{html.escape(piece)}</mark>" if learned else html.escape(piece)
            for piece, learned in row.pieces
        )
        about = f"{row.tokens} tokens, {row.learned} learned"
        if row.label is not None:
            about = f"{row.tokens} tokens, label <b>{html.escape(row.label)}</b>"
        parts.append(
            f'<div class="preview-row"><b>row {number}</b> · {about}'
            f'<pre style="white-space: pre-wrap">{body}</pre></div>'
        )
    return "\n".join(parts)
