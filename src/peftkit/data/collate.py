"""Pad token rows into batches: the training collator, and the padding every batch shares."""

from __future__ import annotations

from typing import Any

import torch


def pad_rows(rows: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    """Rows of token ids (or mask bits, or labels) padded with `value` to the longest row.

    Left padding is what decoder-only models generate from: every prompt then ends at the same
    position, where the new tokens start."""
    width = max(len(row) for row in rows)
    padded = torch.full((len(rows), width), value, dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            where = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            padded[index, where] = torch.tensor(row, dtype=torch.long)
    return padded


def pad_batch(rows: list[list[int]], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """input_ids and attention_mask for rows of token ids."""
    return {
        "input_ids": pad_rows(rows, pad_id, side),
        "attention_mask": pad_rows([[1] * len(row) for row in rows], 0, side),
    }


class Collator:
    """Pads a list of features to the longest in the batch and counts the real tokens it saw."""

    def __init__(self, pad_token_id: int, padding_side: str = "right") -> None:
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.tokens_seen = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        side = self.padding_side
        batch = {
            "input_ids": pad_rows([f["input_ids"] for f in features], self.pad_token_id, side),
            "attention_mask": pad_rows([f["attention_mask"] for f in features], 0, side),
        }
        labels = [f["labels"] for f in features]
        if isinstance(labels[0], list):
            batch["labels"] = pad_rows(labels, -100, side)
        else:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        self.tokens_seen += int(batch["attention_mask"].sum())
        return batch
