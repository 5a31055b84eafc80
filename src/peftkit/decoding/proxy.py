"""Proxy-Tuning (Liu et al., 2024, "Tuning Language Models by Proxy"): steer a model at decode time.

At each step the next-token logits are  base + alpha * (expert - anti_expert),  where the expert is
a small model tuned for the task and the anti-expert is the same small model untuned. No weight of
the base changes. Decoding goes through the base model's own `generate`: `ProxyLogitsProcessor`
keeps the expert and anti-expert in step, each with its own prompt and KV cache (see stream.py).

Order matters: `generate` (transformers 5.24, `_get_logits_processor`) runs the processors it
builds from the generation config first, then the processors passed in `logits_processor`, then
the sampling warpers (temperature, top-k, top-p). `proxy_generate` sets every value-changing
generation option to its neutral value, so the proxy arithmetic sees raw logits and the warpers
see the proxy logits.

The cheap variant keeps one set of small weights: expert = a PEFT model with its LoRA adapter on,
anti-expert = `WithoutAdapter(expert)`, the same model with the adapter switched off."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from peftkit.decoding.prompts import Prompt, check_prompts, prompt_batch
from peftkit.decoding.proxy_options import (
    ProxyDecodingConfig,
    check_alpha,
    check_pair,
    check_vocabularies,
    decoding_config,
)
from peftkit.decoding.stream import ModelStream, model_device
from peftkit.errors import ConfigError


def proxy_logits(
    base: torch.Tensor, expert: torch.Tensor, anti_expert: torch.Tensor, alpha: float
) -> torch.Tensor:
    """base + alpha * (expert - anti_expert) on the ids all three share; -inf on any other id."""
    alpha = check_alpha(alpha)
    shared = min(base.shape[-1], expert.shape[-1], anti_expert.shape[-1])
    # Ids past the shared range are padding rows of a larger embedding, never real tokens.
    combined = torch.full_like(base, float("-inf"))
    shift = expert[..., :shared].to(base) - anti_expert[..., :shared].to(base)
    combined[..., :shared] = base[..., :shared] + alpha * shift
    return combined


class WithoutAdapter:
    """A peftkit-adapted model with its adapter switched off: an anti-expert sharing the expert's
    weights. The switch is the method record's own capability (Method.switch_off)."""

    def __init__(self, adapted_model: Any, switch_off: Any = None) -> None:
        """switch_off: the method's capability, where the model is not one peftkit.apply or
        peftkit.load returned (several adapters loaded through a method's composition)."""
        from peftkit.method import APPLIED_ATTRIBUTE

        state = getattr(adapted_model, APPLIED_ATTRIBUTE, None)
        if switch_off is not None:
            self.peft_model = adapted_model
            self.adapter_off = switch_off(adapted_model)
            return
        if state is None or state.method.switch_off is None:
            what = type(adapted_model).__name__
            if state is not None:
                what = f"a {state.method.name} model (it changes the base's own weights)"
            raise ConfigError(
                f"WithoutAdapter needs a model whose adapter can be switched off (applied or "
                f"loaded by peftkit with a method that can: `peftkit methods -v` says 'switch "
                f"off'), got {what}. Pass the untuned small model as anti_expert instead."
            )
        self.peft_model = adapted_model
        self.adapter_off = state.method.switch_off(adapted_model)

    def __call__(self, **inputs: Any) -> Any:
        """The model's forward with its adapter off."""
        with self.adapter_off():
            return self.peft_model(**inputs)

    @property
    def config(self) -> Any:
        """The wrapped model's config."""
        return self.peft_model.config

    def get_base_model(self) -> Any:
        """The adapted model (so code that unwraps models finds the weights)."""
        return self.peft_model


class ProxyLogitsProcessor(LogitsProcessor):
    """Replace the base model's scores by the proxy-tuned logits at each `generate` step.

    `expert_inputs` / `anti_expert_inputs` are each model's own left-padded prompt batch
    (`input_ids`, `attention_mask`), one row per row of the base batch; they may be rendered
    differently from the base prompt (another chat template). The processor recognises the first
    step of a `generate` call (prefill) and afterwards feeds each model just the new token."""

    def __init__(
        self,
        expert: Any,
        anti_expert: Any,
        alpha: float,
        expert_inputs: Mapping[str, torch.Tensor],
        anti_expert_inputs: Mapping[str, torch.Tensor] | None = None,
        use_cache: bool = True,
    ) -> None:
        check_pair(expert, anti_expert)
        self.expert, self.anti_expert = expert, anti_expert
        self.alpha = check_alpha(alpha)
        self.expert_inputs = dict(expert_inputs)
        self.anti_expert_inputs = dict(anti_expert_inputs or expert_inputs)
        self.use_cache = use_cache
        self.streams: tuple[ModelStream, ModelStream] | None = None
        self.seen: torch.Tensor | None = None  # the base tokens of the previous step

    def reset(self) -> None:
        """Drop the expert's and anti-expert's caches (a new generate call also starts afresh)."""
        self.streams, self.seen = None, None

    def _continues(self, input_ids: torch.Tensor) -> bool:
        """Whether input_ids is the last step's sequence plus one token (else a new generate)."""
        seen = self.seen
        return (
            self.streams is not None
            and seen is not None
            and input_ids.shape == (seen.shape[0], seen.shape[1] + 1)
            and torch.equal(input_ids[:, :-1], seen)
        )

    def _start(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """New streams for a new generate call; their logits for the first new token."""
        self.streams = (
            ModelStream(self.expert, use_cache=self.use_cache, **self.expert_inputs),
            ModelStream(self.anti_expert, use_cache=self.use_cache, **self.anti_expert_inputs),
        )
        for stream, role in zip(self.streams, ("expert", "anti-expert"), strict=True):
            if stream.batch_size != batch_size:
                raise ConfigError(
                    f"The {role} prompt batch has {stream.batch_size} rows but the base "
                    f"generates {batch_size}: give one {role} prompt per base prompt. Proxy "
                    "decoding supports neither beam search nor num_return_sequences > 1."
                )
        return self.streams[0].start(), self.streams[1].start()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """The proxy logits for this step, in the base model's vocabulary layout."""
        if self._continues(input_ids):
            new_tokens = input_ids[:, -1]
            expert, anti_expert = (stream.step(new_tokens) for stream in self.streams)
        else:
            expert, anti_expert = self._start(input_ids.shape[0])
        self.seen = input_ids
        return proxy_logits(
            scores, expert.to(scores.device), anti_expert.to(scores.device), self.alpha
        )


@contextlib.contextmanager
def eval_mode(*models: Any) -> Iterator[None]:
    """Run models in eval mode (no dropout), restoring each one's mode afterwards."""
    modules = [m for m in models if isinstance(m, torch.nn.Module)]
    modes = [m.training for m in modules]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)


def proxy_generate_ids(
    base: Any,
    expert: Any,
    anti_expert: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    config: ProxyDecodingConfig | None = None,
    *,
    expert_prompts: Sequence[Prompt] | None = None,
    anti_expert_prompts: Sequence[Prompt] | None = None,
    expert_tokenizer: Any = None,
    anti_expert_tokenizer: Any = None,
    stopping_criteria: Any = None,
    **options: Any,
) -> torch.Tensor:
    """Proxy-tuned generation; the new token ids, shape (prompts, new tokens), pad after EOS."""
    config = decoding_config(config, options)
    check_pair(expert, anti_expert)
    check_prompts(prompts)
    if getattr(base.config, "is_encoder_decoder", False):
        raise ConfigError("Proxy-Tuning here decodes causal LMs; the base is an encoder-decoder.")
    models = {"base": base, "expert": expert, "anti-expert": anti_expert}
    tokenizers = {
        "base": tokenizer,
        "expert": expert_tokenizer or tokenizer,
        "anti-expert": anti_expert_tokenizer or tokenizer,
    }
    check_vocabularies(models, tokenizers)
    inputs = {}
    for role, own in (
        ("base", None),
        ("expert", expert_prompts),
        ("anti-expert", anti_expert_prompts),
    ):
        if own is not None:
            check_prompts(own, len(prompts), f"{role.replace('-', '_')}_prompts")
        chat = config.chat and role == "expert" and own is None
        device = model_device(models[role])
        inputs[role] = prompt_batch(tokenizers[role], own or prompts, chat, device)
    processor = ProxyLogitsProcessor(
        expert, anti_expert, config.alpha, inputs["expert"], inputs["anti-expert"], config.use_cache
    )
    if config.seed is not None:
        torch.manual_seed(config.seed)
    with eval_mode(base, expert, anti_expert), torch.no_grad():
        output = base.generate(
            **inputs["base"],
            generation_config=config.generation_config(tokenizer),
            logits_processor=LogitsProcessorList([processor]),
            stopping_criteria=stopping_criteria,
        )
    return output[:, inputs["base"]["input_ids"].shape[1] :]


def proxy_generate(
    base: Any,
    expert: Any,
    anti_expert: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    config: ProxyDecodingConfig | None = None,
    *,
    expert_prompts: Sequence[Prompt] | None = None,
    anti_expert_prompts: Sequence[Prompt] | None = None,
    expert_tokenizer: Any = None,
    anti_expert_tokenizer: Any = None,
    stopping_criteria: Any = None,
    **options: Any,
) -> list[str]:
    """Proxy-tuned generation from the base model; one text (the continuation only) per prompt."""
    new_ids = proxy_generate_ids(
        base,
        expert,
        anti_expert,
        tokenizer,
        prompts,
        config,
        expert_prompts=expert_prompts,
        anti_expert_prompts=anti_expert_prompts,
        expert_tokenizer=expert_tokenizer,
        anti_expert_tokenizer=anti_expert_tokenizer,
        stopping_criteria=stopping_criteria,
        **options,
    )
    return tokenizer.batch_decode(new_ids, skip_special_tokens=True)
