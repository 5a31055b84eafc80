"""Proxy-Tuning's options and checks: the decoding config (steering strength and the usual
decoding settings, with the generation config that keeps the proxy arithmetic on raw logits),
alpha, the expert/anti-expert pair and their shared vocabulary."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from transformers import GenerationConfig

from peftkit.config import from_dict
from peftkit.errors import ConfigError, PeftkitError


class VocabularyError(PeftkitError, ValueError):
    """The base, expert and anti-expert do not share one tokenizer: their logits cannot be added."""


def check_alpha(alpha: Any) -> float:
    """alpha as a float; an error unless it is a finite real number."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ConfigError(
            f"Proxy-Tuning alpha must be a finite number (the paper uses 1.0), got {alpha!r}."
        )
    return float(alpha)


def check_pair(expert: Any, anti_expert: Any) -> None:
    """Proxy-Tuning needs both halves of the difference; refuse one alone."""
    if expert is None or anti_expert is None:
        missing = "anti_expert" if expert is not None else "expert"
        raise ConfigError(
            f"Proxy-Tuning needs both an expert and an anti-expert; {missing} is missing. The "
            "anti-expert is the expert's model before tuning; for an expert tuned with an "
            "adapter that switches off use anti_expert=WithoutAdapter(expert)."
        )


def check_proxy_flags(
    expert: str | None, anti_expert: str | None, one_adapter: str | None, expert_adapter: str | None
) -> bool:
    """Refuse a half-given Proxy-Tuning setup (the command-line flags of `generate` and `serve`);
    True when Proxy-Tuning is asked for."""
    pair = [expert, anti_expert]
    if any(pair) and not all(pair):
        raise ConfigError(
            "Proxy-Tuning needs both --proxy-expert (the tuned small model) and "
            "--proxy-anti-expert (the same small model untuned), or --proxy-adapter alone."
        )
    if one_adapter and any(pair):
        raise ConfigError(
            "Give Proxy-Tuning either --proxy-adapter (one small model, adapter on and off) or "
            "--proxy-expert with --proxy-anti-expert, not both."
        )
    if expert_adapter and not expert:
        raise ConfigError("--expert-adapter goes on the expert: give --proxy-expert too.")
    return all(pair) or bool(one_adapter)


def same_vocabulary(first: Any, second: Any) -> bool:
    """Whether two tokenizers map every token to the same id."""
    return first is second or first.get_vocab() == second.get_vocab()


def output_vocab_size(model: Any) -> int:
    """How many ids the model's LM head scores (padded embeddings make it exceed the tokenizer)."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.vocab_size)


def check_vocabularies(models: Mapping[str, Any], tokenizers: Mapping[str, Any]) -> None:
    """One tokenizer for all three models, and each model scores every one of its ids."""
    reference = tokenizers["base"]
    for role, tokenizer in tokenizers.items():
        if not same_vocabulary(reference, tokenizer):
            raise VocabularyError(
                f"The {role} tokenizer differs from the base tokenizer (token-to-id maps differ): "
                "Proxy-Tuning adds logits id by id, so all three models must share one tokenizer. "
                "Use an expert and anti-expert trained on the base model's tokenizer."
            )
    for role, model in models.items():
        size = output_vocab_size(model)
        if size < len(reference):
            raise VocabularyError(
                f"The {role} model scores {size} ids but the tokenizer has {len(reference)} "
                "tokens: it was not built for this tokenizer. Use models that share one tokenizer."
            )


@dataclass(frozen=True)
class ProxyDecodingConfig:
    """Options of proxy-tuned decoding: the steering strength and the usual decoding settings."""

    alpha: float = field(
        default=1.0, metadata={"help": "weight of (expert - anti_expert); 0 gives the base model"}
    )
    max_new_tokens: int = field(default=64, metadata={"help": "tokens to generate per prompt"})
    min_new_tokens: int = field(
        default=0, metadata={"help": "tokens to generate before end-of-sequence may win"}
    )
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    top_k: int | None = field(default=None, metadata={"help": "sample from the k best tokens"})
    top_p: float | None = field(default=None, metadata={"help": "nucleus sampling mass"})
    chat: bool = field(
        default=False,
        metadata={
            "help": "render the expert's prompts with its tokenizer's chat template (the base "
            "and anti-expert read them plain, as in the paper)"
        },
    )
    use_cache: bool = field(
        default=True, metadata={"help": "keep a KV cache per model (off: recompute, for checks)"}
    )
    seed: int | None = field(default=None, metadata={"help": "random seed for sampling"})

    def __post_init__(self) -> None:
        check_alpha(self.alpha)
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(
                f"min_new_tokens must be between 0 and max_new_tokens ({self.max_new_tokens}), "
                f"got {self.min_new_tokens}."
            )
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"temperature must be a positive number, got {self.temperature}.")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be at least 1 (or None for no limit), got {self.top_k}.")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1] (or None), got {self.top_p}.")

    def generation_config(self, tokenizer: Any) -> GenerationConfig:
        """A GenerationConfig whose only logit changes are the warpers, run after the proxy."""
        sampling = {}
        if self.do_sample:
            sampling = {
                "temperature": self.temperature,
                "top_k": self.top_k or 0,  # 0, not None: None would let generate's default 50 in
                "top_p": self.top_p or 1.0,
            }
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            # A mask on end-of-sequence (-inf stays -inf after the proxy shift), so order is moot.
            min_new_tokens=self.min_new_tokens,
            do_sample=self.do_sample,
            num_beams=1,
            num_return_sequences=1,
            use_cache=self.use_cache,
            # Neutral values, so a model's own generation_config cannot change the raw logits
            # before the proxy arithmetic sees them. (Masks such as min_length may stay: -inf
            # plus any finite shift is still -inf.)
            repetition_penalty=1.0,
            encoder_repetition_penalty=1.0,
            guidance_scale=1.0,
            renormalize_logits=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )


def decoding_config(config: ProxyDecodingConfig | None, options: Mapping[str, Any]) -> Any:
    """The config given, or one built from keyword options (unknown keys refused)."""
    if config is not None and options:
        raise ConfigError("Pass decoding options either in the config object or as keywords.")
    if config is not None:
        return config
    if "alpha" in options:
        check_alpha(options["alpha"])  # before from_dict, which would turn "nan" into a float
    return from_dict(ProxyDecodingConfig, dict(options), where="proxy decoding options")
