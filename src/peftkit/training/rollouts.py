"""GRPO's rollouts through peftkit's own batched decoding: the training model as it is (its
adapter live: no merge, no copy of weights), the serving engine's key/value cache machinery
(serve/kv.py: GrowingLayers written in place, rows leaving by `keep_rows`), and TRL's sampling.

Why not the serving engine itself: its loop is a thread that samples row by row with each
request's own generator and decodes every row's text at each token for streaming; a rollout needs
none of that, and one batched draw per step is what makes its tokens TRL's (below). The cache
pieces are the engine's own.

What makes it faster than `generate` (TRL's default path) while giving the same tokens:
- each distinct prompt runs its prefill once: a group's num_generations copies share the prompt's
  keys and values (selected into every row once, into buffers with room for the completion);
- a row that reaches a stop token leaves the batch (transformers keeps running it on padding
  until every row has stopped);
- the cache grows in place (transformers' DynamicLayer concatenates every layer each step).

Same tokens: the logits go through transformers' own warpers in `generate`'s order (temperature,
top_k, top_p, min_p) and one `torch.multinomial` over every row of the rollout each step, rows
that already stopped included (with any valid distribution: a draw consumes the random stream by
the tensor's size only), as `generate` draws. Given the same random state and the same logits,
the completions are `generate`'s token for token; logits from differently shaped batches can
differ in their last bits, which changes a token only where a draw falls on that boundary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from peftkit.decoding.prompts import left_padded
from peftkit.decoding.stream import accepts_logits_to_keep, model_device, positions_from_mask
from peftkit.errors import ConfigError
from peftkit.serve import kv


@dataclass(frozen=True)
class Sampler:
    """How the next token is chosen: TRL's GRPO sampling settings (do_sample False: arg max)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    do_sample: bool = True

    def warpers(self) -> list[Any]:
        """transformers' own logits warpers, in the order `generate` applies them."""
        from transformers.generation.logits_process import (
            MinPLogitsWarper,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        if not self.do_sample:
            return []
        warpers: list[Any] = []
        if self.temperature is not None and self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k is not None and self.top_k != 0:
            warpers.append(TopKLogitsWarper(top_k=self.top_k))
        if self.top_p is not None and self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=self.top_p))
        if self.min_p is not None:
            warpers.append(MinPLogitsWarper(min_p=self.min_p))
        return warpers


@dataclass
class Rollout:
    """Each row's completion (up to and including its first stop token) and each token's
    log-probability under the distribution it was drawn from (after the warpers)."""

    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    forwards: int = 0  # model calls: one prefill and one per decode step
    prefill_rows: int = 0  # distinct prompts run in the prefill


def _run(model: Any, **inputs: Any) -> Any:
    """One forward without gradients."""
    with torch.no_grad():
        return model(**inputs)


def _expanded(cache: Any, index: torch.Tensor, length: int, spare: int) -> Any:
    """The prefill's cache with row i holding prompt index[i]'s keys and values, each layer in a
    growing buffer with room for `spare` more columns (one copy per layer)."""
    kv.growing(cache)
    for layer in cache.layers:
        keys, values = layer.keys.index_select(0, index), layer.values.index_select(0, index)
        layer.place([keys], [values], length, spare=spare)
    return cache


def check_cache(cache: Any, length: int) -> None:
    """Refuse a model whose cache is not plain or holds more positions than its input (virtual
    tokens): the rollout's masks and positions would not line up with it."""
    kv.check_plain(cache)
    held = cache.get_seq_length()
    if held != length:
        raise ConfigError(
            f"grpo.rollouts: peftkit decodes with a plain key/value cache of the prompt's own "
            f"positions, but this model's cache holds {held} positions for {length} prompt "
            "tokens (the method adds virtual tokens). Set grpo.rollouts: trl."
        )


def check_model(model: Any, pad: int) -> None:
    """Refuse, before training starts, a model the rollouts cannot decode (one forward of two
    tokens): its cache must be plain and hold exactly the prompt's positions."""
    device = model_device(model)
    tokens = torch.tensor([[pad, pad]], device=device)
    output = _run(model, input_ids=tokens, attention_mask=torch.ones_like(tokens), use_cache=True)
    check_cache(output.cache, tokens.shape[1])


def rollout(
    model: Any,
    prompts: list[list[int]],
    sampler: Sampler,
    max_new_tokens: int,
    stops: list[int],
    pad: int,
) -> Rollout:
    """Continue every prompt (token ids) with the model as it is, in one batch."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    device = model_device(model)
    owner: dict[tuple[int, ...], int] = {}
    rows = [owner.setdefault(tuple(prompt), len(owner)) for prompt in prompts]
    distinct = [list(prompt) for prompt in owner]
    inputs = left_padded(distinct, pad, device)
    mask = inputs["attention_mask"]
    positions = positions_from_mask(mask)
    extra = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    output = _run(model, input_ids=inputs["input_ids"], attention_mask=mask,
                  position_ids=positions, use_cache=True, **extra)  # fmt: skip
    length = mask.shape[1]
    check_cache(output.cache, length)
    index = torch.tensor(rows, device=device)
    cache = _expanded(output.cache, index, length, spare=max_new_tokens)
    mask, positions = mask.index_select(0, index), positions[:, -1].index_select(0, index) + 1
    logits = output.logits[:, -1].float().index_select(0, index)
    del output

    warpers = sampler.warpers()
    stop_ids = torch.tensor(sorted(set(stops)), device=device, dtype=torch.long)
    total = len(prompts)
    live = torch.arange(total, device=device)  # which rollout row each batch row is
    drawn: torch.Tensor | None = None  # every row's distribution of its latest step
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (rows, tokens, logprobs)
    forwards = 1
    for step in range(max_new_tokens):
        scores = logits
        for warper in warpers:
            scores = warper(None, scores)
        if sampler.do_sample:
            probabilities = scores.softmax(-1)
            if drawn is None:
                drawn = probabilities
            else:
                drawn[live] = probabilities
            tokens = torch.multinomial(drawn, num_samples=1)[:, 0].index_select(0, live)
            chosen = probabilities.gather(1, tokens[:, None])[:, 0].log()
        else:
            tokens = scores.argmax(-1)
            chosen = torch.log_softmax(scores, -1).gather(1, tokens[:, None])[:, 0]
        steps.append((live, tokens, chosen))
        going = ~torch.isin(tokens, stop_ids)
        if step == max_new_tokens - 1:
            break
        if not bool(going.all()):
            if not bool(going.any()):
                break
            keep = going.nonzero()[:, 0]
            cache, mask = kv.keep_rows(cache, mask, keep)
            positions, live, tokens = positions[keep], live[keep], tokens[keep]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
        output = _run(model, input_ids=tokens[:, None], attention_mask=mask,
                      position_ids=positions[:, None], cache=cache, use_cache=True)  # fmt: skip
        cache, positions = output.cache, positions + 1
        logits = output.logits[:, -1].float()
        forwards += 1
        del output
    completion_ids: list[list[int]] = [[] for _ in range(total)]
    logprobs: list[list[float]] = [[] for _ in range(total)]
    for who, tokens, chosen in steps:
        for row, token, logprob in zip(who.tolist(), tokens.tolist(), chosen.tolist(), strict=True):
            completion_ids[row].append(token)
            logprobs[row].append(logprob)
    return Rollout(completion_ids, logprobs, forwards, len(distinct))


def trl_sampler(trainer: Any) -> Sampler:
    """The sampling TRL's GRPO trainer would do, refusing by name what peftkit's rollouts do not
    (then grpo.rollouts: trl)."""
    args = trainer.args
    refused = [
        name
        for name, on in (
            ("use_vllm", args.use_vllm),
            (
                "use_transformers_continuous_batching",
                getattr(args, "use_transformers_continuous_batching", False),
            ),
            ("generation_kwargs", bool(args.generation_kwargs)),
            ("cache_implementation", getattr(args, "cache_implementation", None) is not None),
            ("repetition_penalty", trainer.repetition_penalty != 1.0),
            ("tools", bool(getattr(trainer, "tools", None))),
            ("environment_factories", getattr(trainer, "environment_factories", None) is not None),
            ("rollout_func", getattr(trainer, "rollout_func", None) is not None),
            ("a multimodal processor", bool(getattr(trainer, "_is_vlm", False))),
        )  # fmt: skip
        if on
    ]
    if refused:
        raise ConfigError(
            f"grpo.rollouts: peftkit generates text-only completions with temperature, top_k, "
            f"top_p and min_p; this trainer also sets {', '.join(refused)}. Set "
            "grpo.rollouts: trl."
        )
    return Sampler(trainer.temperature, trainer.top_k, trainer.top_p, trainer.min_p)
