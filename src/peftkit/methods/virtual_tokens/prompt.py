"""Prompt tuning (Lester et al., 2021): trainable soft-prompt vectors prepended to the input
embeddings; every weight of the model stays frozen.

peftkit writes it on transformers' public interfaces (input embeddings, attention mask, position
ids; see virtual_tokens.py) because PEFT 0.21.2's generate() for it is wrong on transformers 5.24.
Files stay in PEFT's format: a `prompt_embeddings` tensor and a PROMPT_TUNING adapter_config.json.

Causal LMs return logits for the caller's tokens only (the virtual positions are cut off), so
logits and labels line up with input_ids as for the base model. Encoder-decoders get the prompt
in front of the encoder input (PEFT's num_transformer_submodules=1)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import peft
import torch
from torch import nn

from peftkit.errors import AdapterError, ConfigError
from peftkit.method import Method
from peftkit.methods.virtual_tokens import shared as vt
from peftkit.targeting import task_head_modules, task_type

INIT_CHOICES = ("random", "text")


@dataclass(frozen=True)
class PromptTuningConfig:
    """Soft prompt of `num_virtual_tokens` vectors in front of every input."""

    num_virtual_tokens: int = field(default=20, metadata={"help": "length of the soft prompt"})
    init: str = field(
        default="random",
        metadata={
            "help": "'random' (normal, at the scale of the model's word embeddings) or 'text' "
            "(the embeddings of init_text's tokens, repeated to fill the prompt)"
        },
    )
    init_text: str | None = field(
        default=None, metadata={"help": "text whose token embeddings start the prompt (init: text)"}
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "tokenizer for init_text: a bundled model name, folder or hub id; "
            "default: the base model's own folder (config.name_or_path)"
        },
    )
    init_token_ids: list[int] | None = field(
        default=None,
        metadata={"help": "token ids to start the prompt from (init: text, instead of init_text)"},
    )

    def __post_init__(self) -> None:
        vt.check_num_virtual_tokens(self.num_virtual_tokens)
        if self.init not in INIT_CHOICES:
            raise ConfigError(f"init must be one of {INIT_CHOICES}, got {self.init!r}.")
        if self.init == "text" and not self.init_text and not self.init_token_ids:
            raise ConfigError("init: text needs init_text (and a tokenizer) or init_token_ids.")


class SoftPrompt(nn.Module):
    """The trainable prompt: one vector per virtual token."""

    def __init__(self, num_virtual_tokens: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, dim)

    def batch(self, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
        """The prompt for a batch: (batch, virtual tokens, dim)."""
        weight = self.embedding.weight.to(dtype)
        return weight.unsqueeze(0).expand(batch_size, -1, -1)


def load_tokenizer(name: str) -> Any:
    """A tokenizer by bundled model name, local folder or hub id."""
    from peftkit.models.bundled import minilm_folder, smollm2_folder
    from peftkit.models.tiny import tiny_tokenizer

    if name.startswith("tiny-"):
        return tiny_tokenizer()
    folders = {"minilm": minilm_folder, "smollm2-135m": smollm2_folder}
    import transformers

    source = folders[name]() if name in folders else name
    return transformers.AutoTokenizer.from_pretrained(source)


def init_token_ids(model: nn.Module, config: PromptTuningConfig) -> list[int]:
    """The token ids the prompt starts from, repeated or cut to its length (as PEFT does)."""
    ids = list(config.init_token_ids or [])
    if not ids:
        name = config.tokenizer or getattr(model.config, "name_or_path", "")
        if not name:
            raise ConfigError(
                "init: text needs a tokenizer: set `tokenizer` to the model's name or folder "
                "(or pass init_token_ids)."
            )
        ids = load_tokenizer(name)(config.init_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"init_text {config.init_text!r} has no tokens.")
    vocab = model.get_input_embeddings().num_embeddings
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ConfigError(f"init token ids {bad[:5]} are outside the vocabulary (size {vocab}).")
    repeats = math.ceil(config.num_virtual_tokens / len(ids))
    return (ids * repeats)[: config.num_virtual_tokens]


def initial_prompt(model: nn.Module, config: PromptTuningConfig) -> torch.Tensor:
    """Starting prompt vectors: token embeddings of the init text, or random at their scale."""
    words = model.get_input_embeddings().weight.detach()
    if config.init == "text":
        return words[torch.tensor(init_token_ids(model, config))].clone().float()
    shape = (config.num_virtual_tokens, words.shape[1])
    return torch.randn(shape) * words.float().std()


def _prepend(wrapper: vt.VirtualTokenModel, kwargs: vt.Kwargs, embed: nn.Module) -> None:
    """Put the prompt in front of the call's input embeddings (ids become embeddings)."""
    embeds = kwargs.pop("inputs_embeds", None)
    ids = kwargs.pop("input_ids", None)
    if embeds is None:
        embeds = embed(ids)
    prompt = wrapper.virtual.batch(embeds.shape[0], embeds.dtype)
    kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
    if kwargs.get("token_type_ids") is not None:
        types = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat(
            [types.new_zeros(types.shape[0], prompt.shape[1]), types], 1
        )


def _decoder_hooks(wrapper: vt.VirtualTokenModel) -> None:
    """Hooks for decoder-only and encoder-only models: the prompt leads the input sequence."""
    base = wrapper.base_model
    count = wrapper.num_virtual_tokens
    config = vt.text_config(base)
    records: list[vt.CallRecord] = []

    def before(module: nn.Module, args: tuple, kwargs: vt.Kwargs) -> tuple[tuple, vt.Kwargs]:
        kw = vt.named_arguments(module, args, kwargs)
        batch, length = vt.sequence_shape(kw, "input_ids", "inputs_embeds")
        past = vt.cache_length(kw.get("cache"))
        mask = kw.get("attention_mask")
        real_total = mask.shape[1] if mask is not None else max(past - count, 0) + length
        vt.check_length(config, count, real_total)
        positions = vt.shift_positions(module, kw, length, count)
        fresh = past == 0
        if fresh:
            _prepend(wrapper, kw, module.get_input_embeddings())
            if positions is not None:
                virtual = torch.arange(count, device=positions.device).expand(batch, -1)
                positions = torch.cat([virtual, positions.expand(batch, -1)], dim=1)
            labels = kw.get("labels")
            if labels is not None and labels.dim() == 2 and labels.shape[1] == length:
                kw["labels"] = torch.cat([labels.new_full((batch, count), -100), labels], dim=1)
        if mask is not None:
            kw["attention_mask"] = vt.with_ones(mask, count)
        if positions is not None:
            kw["position_ids"] = positions
        records.append(vt.CallRecord(count if fresh else 0, length, drop_cache=False))
        return (), kw

    def after(module: nn.Module, args: tuple, kwargs: vt.Kwargs, output: Any) -> Any:
        return vt.strip_output(output, records.pop())

    wrapper.add_hooks(base, before, after)


def _encoder_decoder_hooks(wrapper: vt.VirtualTokenModel) -> None:
    """Hooks for encoder-decoders: the prompt leads the encoder input; cross-attention sees it."""
    base = wrapper.base_model
    count = wrapper.num_virtual_tokens
    embed = base.get_input_embeddings()

    def before_encoder(
        module: nn.Module, args: tuple, kwargs: vt.Kwargs
    ) -> tuple[tuple, vt.Kwargs]:
        kw = vt.named_arguments(module, args, kwargs)
        _, length = vt.sequence_shape(kw, "input_ids", "inputs_embeds")
        _prepend(wrapper, kw, embed)
        mask = kw.get("attention_mask")
        # The top-level hook already lengthened the mask when the model runs its own encoder;
        # generate() calls the encoder directly, with the caller's mask.
        if mask is not None and mask.shape[1] == length:
            kw["attention_mask"] = vt.with_ones(mask, count)
        return (), kw

    def before_model(module: nn.Module, args: tuple, kwargs: vt.Kwargs) -> tuple[tuple, vt.Kwargs]:
        kw = vt.named_arguments(module, args, kwargs)
        if kw.get("attention_mask") is not None:
            kw["attention_mask"] = vt.with_ones(kw["attention_mask"], count)
        return (), kw

    wrapper.add_hooks(base.get_encoder(), before_encoder, None)
    wrapper.add_hooks(base, before_model, None)


def apply(model: nn.Module, config: PromptTuningConfig) -> vt.VirtualTokenModel:
    """Freeze the model and wrap it with a trainable soft prompt (a new task head trains too)."""
    vt.text_config(model)
    start = initial_prompt(model, config)
    prompt = SoftPrompt(config.num_virtual_tokens, start.shape[1])
    with torch.no_grad():
        prompt.embedding.weight.copy_(start)
    param = model.get_input_embeddings().weight
    wrapper = vt.VirtualTokenModel(model, prompt.to(param.device), config.num_virtual_tokens)
    if getattr(model.config, "is_encoder_decoder", False):
        _encoder_decoder_hooks(wrapper)
    else:
        _decoder_hooks(wrapper)
    return wrapper


def state_dict(model: vt.VirtualTokenModel) -> dict[str, Any]:
    """The prompt under PEFT's key, plus a new task head under PEFT's names."""
    return {"prompt_embeddings": model.virtual.embedding.weight.detach(), **vt.head_state(model)}


def load_state_dict(model: vt.VirtualTokenModel, tensors: dict[str, Any]) -> None:
    """Load a prompt written by state_dict or by PEFT."""
    if "prompt_embeddings" not in tensors:
        raise AdapterError(
            "The adapter has no 'prompt_embeddings' tensor: not a prompt-tuning file."
        )
    with torch.no_grad():
        model.virtual.embedding.weight.copy_(tensors["prompt_embeddings"])
    vt.load_head_state(model, tensors)


def remove(model: vt.VirtualTokenModel) -> nn.Module:
    """Detach the hooks and give back the base model."""
    return model.remove_hooks()


def merge(model: vt.VirtualTokenModel) -> nn.Module:
    """Refuse: a soft prompt is extra input, not a weight change."""
    raise AdapterError(
        "Prompt tuning cannot be merged: the soft prompt is extra input positions, not a change "
        "to any weight. Save the adapter (peftkit.save) and load it onto the base model instead."
    )


def adapter_config(model: vt.VirtualTokenModel, config: PromptTuningConfig) -> dict[str, Any]:
    """PEFT's PROMPT_TUNING adapter_config.json for this model."""
    base = model.base_model
    text = vt.text_config(base)
    heads = task_head_modules(base)
    peft_config = peft.PromptTuningConfig(
        task_type=task_type(base),
        num_virtual_tokens=config.num_virtual_tokens,
        token_dim=model.virtual.embedding.weight.shape[1],
        num_transformer_submodules=1,
        num_attention_heads=_first(text, "num_attention_heads", "n_head", "num_heads"),
        num_layers=_first(text, "num_hidden_layers", "n_layer", "num_layers"),
        modules_to_save=heads or None,
        inference_mode=True,
    )
    saved = peft_config.to_dict()
    return {k: getattr(v, "value", v) for k, v in saved.items()}


def _first(config: Any, *names: str) -> int | None:
    """The first of several config attribute names that the config has."""
    for name in names:
        if getattr(config, name, None) is not None:
            return getattr(config, name)
    return None


def config_from_adapter(saved: dict[str, Any]) -> PromptTuningConfig:
    """Our config from a PROMPT_TUNING adapter_config.json (the weights come from the file)."""
    submodules = saved.get("num_transformer_submodules") or 1
    if submodules != 1:
        raise AdapterError(
            f"This prompt-tuning adapter has num_transformer_submodules={submodules} (a prompt for "
            "the decoder too, PEFT's default for seq2seq); peftkit reads encoder-side prompts only "
            "(num_transformer_submodules=1)."
        )
    return PromptTuningConfig(num_virtual_tokens=saved["num_virtual_tokens"])


PROMPT_TUNING = Method(
    name="prompt_tuning",
    config_cls=PromptTuningConfig,
    apply=apply,
    state_dict=state_dict,
    load_state_dict=load_state_dict,
    merge=merge,
    remove=remove,
    peft_type="PROMPT_TUNING",
    adapter_config=adapter_config,
    config_from_adapter=config_from_adapter,
    check_loaded=vt.check_loaded,
    description="trainable soft prompt prepended to the input embeddings (PEFT's file format)",
)
