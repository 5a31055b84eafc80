"""Prompts as token ids: text, chat messages rendered through the chat template, or ids as given.

A prompt is a text, a list of chat messages ({"role", "content"} dicts), or a list of token ids.
Every decoding path (generate, app evaluation, Proxy-Tuning, the server) reads prompts here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from peftkit.chat_template import render_prompt
from peftkit.data.collate import pad_batch
from peftkit.errors import ConfigError

Prompt = str | Sequence[Any]


def is_token_ids(prompt: Prompt) -> bool:
    """Whether a prompt is already token ids (used as is: no special tokens added)."""
    return not isinstance(prompt, str) and all(isinstance(item, int) for item in prompt)


def render_chat(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of a user message (or message list) through the chat template (the
    tokenizer's own, or the fallback template the chat task trains with)."""
    # Render to text, then tokenize without special tokens: the template already holds them.
    return tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def to_token_ids(
    tokenizer: Any, prompt: Prompt, chat: bool, add_special_tokens: bool = True
) -> list[int]:
    """One prompt as token ids: ids as given, a chat rendering, or the tokenized text."""
    if is_token_ids(prompt) and len(prompt) > 0:
        return list(prompt)
    if chat:
        return render_chat(tokenizer, prompt)
    if not isinstance(prompt, str):
        raise ConfigError(
            f"A prompt must be text or a list of token ids, got {type(prompt).__name__}. Chat "
            "messages are rendered through the chat template only where chat=True (Proxy-Tuning "
            "renders them only for the expert): give the others text, or their own rendered "
            "prompts."
        )
    return tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]


def left_padded(rows: list[list[int]], pad_id: int, device: torch.device) -> dict[str, Any]:
    """input_ids and attention_mask with padding on the left, where decoder-only models want it."""
    if any(len(row) == 0 for row in rows):
        raise ConfigError("A prompt is empty after tokenization; give every prompt some text.")
    return {k: v.to(device) for k, v in pad_batch(rows, pad_id, side="left").items()}


def pad_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else its eos, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def prompt_batch(
    tokenizer: Any, prompts: Sequence[Prompt], chat: bool, device: torch.device
) -> dict[str, Any]:
    """A model's left-padded prompt batch."""
    rows = [to_token_ids(tokenizer, prompt, chat) for prompt in prompts]
    return left_padded(rows, pad_id(tokenizer), device)


def check_prompts(prompts: Any, count: int | None = None, role: str = "prompts") -> None:
    """A non-empty list of prompts (one per base prompt when `count` is given)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ConfigError(
            f"{role} must be a non-empty list of prompts (put a single one in a list)."
        )
    if count is not None and len(prompts) != count:
        raise ConfigError(
            f"{role} has {len(prompts)} entries but there are {count} prompts; give one per prompt."
        )
