"""Turn rows into model features for each task type, and pad them into batches."""

from __future__ import annotations

from typing import Any

import torch

Feature = dict[str, list[int]]


def classification_features(
    rows: list[dict[str, Any]], tokenizer: Any, text: str, label: str, labels: list[str],
    max_length: int,
) -> list[Feature]:  # fmt: skip
    """input_ids, attention_mask and the label index of each (text, label) row, truncated."""
    index = {name: i for i, name in enumerate(labels)}
    encoded = tokenizer([str(row[text]) for row in rows], truncation=True, max_length=max_length)
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": index[str(row[label])]}
        for ids, mask, row in zip(
            encoded["input_ids"], encoded["attention_mask"], rows, strict=True
        )
    ]


def prompt_response_feature(
    tokenizer: Any, prompt: str, response: str, max_length: int
) -> Feature | None:
    """Causal-LM features: prompt + response + EOS, with the loss on the response (and EOS) only.

    Returns None when truncation leaves no response token to learn from."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    # EOS is learnt, so the tuned model stops (a known failure of SFT without it).
    response_ids = response_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
    if all(label == -100 for label in labels):
        return None
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def seq2seq_feature(tokenizer: Any, source: str, target: str, max_length: int) -> dict[str, Any]:
    """Encoder input from the source, decoder labels from the target (with EOS); both truncated
    to max_length, and the feature says whether either was (the run counts them)."""
    source_ids = tokenizer(source)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    ids = source_ids[:max_length]
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": target_ids[: max_length - 1] + [tokenizer.eos_token_id],
        "reference": target,
        "truncated": len(source_ids) > max_length or len(target_ids) > max_length - 1,
    }


class Collator:
    """Pads a list of features to the longest in the batch and counts the real tokens it saw."""

    def __init__(self, pad_token_id: int, padding_side: str = "right") -> None:
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.tokens_seen = 0

    def _pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(row) for row in rows)
        padded = []
        for row in rows:
            fill = [value] * (width - len(row))
            padded.append(fill + row if self.padding_side == "left" else row + fill)
        return torch.tensor(padded, dtype=torch.long)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {
            "input_ids": self._pad([f["input_ids"] for f in features], self.pad_token_id),
            "attention_mask": self._pad([f["attention_mask"] for f in features], 0),
        }
        labels = [f["labels"] for f in features]
        if isinstance(labels[0], list):
            batch["labels"] = self._pad(labels, -100)
        else:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        self.tokens_seen += int(batch["attention_mask"].sum())
        return batch
