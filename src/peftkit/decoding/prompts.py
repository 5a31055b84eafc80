"""Each model's own prompt batch: texts or token ids, chat rendering, left padding.

The expert was tuned with a chat template that the untuned base and anti-expert never saw, so each
model may read the same request rendered its own way; only the generated tokens are common.
As in the paper's code, by default only the expert's prompts are rendered with a chat template."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from peftkit.errors import ConfigError

# A prompt is a text, a list of chat messages ({"role", "content"} dicts), or a list of token ids.
Prompt = str | Sequence[Any]


def is_token_ids(prompt: Prompt) -> bool:
    """Whether a prompt is already token ids (used as is: no special tokens added)."""
    return not isinstance(prompt, str) and all(isinstance(item, int) for item in prompt)


def render_chat(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of a user message (or message list) in the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "chat=True renders the expert's prompts with its tokenizer's chat template, but that "
            "tokenizer has none: set expert_tokenizer.chat_template, or pass expert_prompts "
            "rendered yourself."
        )
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    # Render to text, then tokenize without special tokens: the template already holds them.
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def to_token_ids(tokenizer: Any, prompt: Prompt, chat: bool) -> list[int]:
    """One prompt as token ids: ids as given, a chat rendering, or the tokenized text."""
    if is_token_ids(prompt) and not isinstance(prompt, str) and len(prompt) > 0:
        return list(prompt)
    if chat:
        return render_chat(tokenizer, prompt)
    if not isinstance(prompt, str):
        raise ConfigError(
            f"A prompt must be text or a list of token ids, got {type(prompt).__name__}. Chat "
            "messages are rendered only for the expert (chat=True); give the base and the "
            "anti-expert text, or their own rendered prompts (prompts=, anti_expert_prompts=)."
        )
    return tokenizer(prompt)["input_ids"]


def left_padded(rows: list[list[int]], pad_id: int, device: torch.device) -> dict[str, Any]:
    """input_ids and attention_mask with padding on the left, where decoder-only models want it."""
    if any(len(row) == 0 for row in rows):
        raise ConfigError("A prompt is empty after tokenization; give every prompt some text.")
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, width - len(row) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def prompt_batch(
    tokenizer: Any, prompts: Sequence[Prompt], chat: bool, device: torch.device
) -> dict[str, Any]:
    """A model's left-padded prompt batch."""
    rows = [to_token_ids(tokenizer, prompt, chat) for prompt in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return left_padded(rows, pad_id, device)


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
