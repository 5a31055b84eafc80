"""One generation helper for every caller (the CLI, task evaluation, the applications, and later
the server and UI): prompts in, texts out, with padding, chat rendering and stopping done once.

Decoder-only models read left-padded prompts (each row then ends where the new tokens start) and
return prompt + new tokens, of which only the new ones are kept; encoder-decoders read the prompt
in the encoder and return only decoder tokens (after the start token). A row's text is decoded up
to its first stop token; `stopped` says whether it reached one within the budget."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.data.collate import pad_batch
from peftkit.decoding.prompts import Prompt, pad_id, to_token_ids
from peftkit.errors import ConfigError


@dataclass(frozen=True)
class Generation:
    """One prompt's continuation."""

    text: str  # decoded up to (not including) the first stop token
    token_ids: list[int]  # the new tokens up to (not including) the first stop token
    stopped: bool  # whether a stop token ended it within the budget
    new_tokens: int  # tokens generated, the stop token included


def stop_token_ids(model: nn.Module, tokenizer: Any, eos_token_id: int | None) -> set[int]:
    """The ids that end a row: the one given, else the model's generation config's, else the
    tokenizer's eos."""
    if eos_token_id is not None:
        return {eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        return set()
    return set(configured) if isinstance(configured, list | tuple) else {configured}


def check_options(max_new_tokens: int, temperature: float, top_k: int | None,
                  top_p: float | None) -> None:  # fmt: skip
    """Refuse decoding numbers transformers would reject with a traceback."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    if temperature <= 0:
        raise ConfigError(
            f"temperature must be above 0, got {temperature} (for greedy decoding, do not sample)."
        )
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be at least 1, got {top_k}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}.")


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 64,
    chat: bool = False,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | None = None,
    stop_strings: list[str] | None = None,
    add_special_tokens: bool = True,
) -> list[Generation]:
    """Continue each prompt (text, chat messages with chat=True, or token ids), in batches."""
    check_options(max_new_tokens, temperature, top_k, top_p)
    if seed is not None:
        torch.manual_seed(seed)
    encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    pad = pad_id(tokenizer)
    stops = stop_token_ids(model, tokenizer, eos_token_id)
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                               "pad_token_id": pad}  # fmt: skip
    if eos_token_id is not None:
        options["eos_token_id"] = eos_token_id
    if do_sample:
        options.update(temperature=temperature, top_k=top_k, top_p=top_p)
    if stop_strings:
        options.update(stop_strings=stop_strings, tokenizer=tokenizer)
    weight = next(model.parameters(), None)
    device = weight.device if weight is not None else torch.device("cpu")
    results: list[Generation] = []
    model.eval()
    for start in range(0, len(prompts), batch_size):
        rows = [to_token_ids(tokenizer, p, chat, add_special_tokens)
                for p in prompts[start : start + batch_size]]  # fmt: skip
        if any(not row for row in rows):
            raise ConfigError("A prompt is empty after tokenization; give every prompt some text.")
        batch = pad_batch(rows, pad, side="right" if encoder_decoder else "left")
        with torch.no_grad():
            output = model.generate(**{k: v.to(device) for k, v in batch.items()}, **options)
        # Decoder-only: drop the prompt; encoder-decoder: drop the decoder's start token.
        new = output[:, 1:] if encoder_decoder else output[:, batch["input_ids"].shape[1] :]
        for row in new.tolist():
            end = next((i for i, token in enumerate(row) if token in stops), None)
            kept = row if end is None else row[:end]
            text = tokenizer.decode(kept, skip_special_tokens=True)
            results.append(Generation(text, kept, end is not None, len(kept) + (end is not None)))
    return results
