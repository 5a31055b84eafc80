"""Prefix tuning (Li and Liang, 2021): trainable key/value prefixes in every attention layer,
optionally produced during training by a small MLP (the reparameterisation) that is folded away
for saving.

peftkit writes it on transformers' public `Cache` interface (see virtual_tokens.py): a call that
starts a sequence gets a DynamicCache (an EncoderDecoderCache's self-attention part for
encoder-decoders) that already holds the prefix, and the attention mask grows by P. PEFT 0.21.2
does the same through the `past_key_values` argument, which transformers 5.24 renamed, and its
generate() is wrong there. Files stay in PEFT's format: a `prompt_embeddings` tensor of shape
(P, num_layers * 2 * token_dim) and a PREFIX_TUNING adapter_config.json. With grouped-query
attention PEFT's token_dim is num_key_value_heads * head_dim, so the prefix has the key/value
width, not the hidden width. For encoder-decoders (PEFT's num_transformer_submodules=2) the
prefix goes into the decoder's self-attention, laid out exactly as PEFT lays it out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import peft
import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from peftkit.errors import AdapterError, ConfigError, DataError
from peftkit.method import Method
from peftkit.methods.virtual_tokens import shared as vt
from peftkit.methods.virtual_tokens.prefix_layout import PrefixEncoder, layout
from peftkit.targeting import task_head_modules, task_type


@dataclass(frozen=True)
class PrefixTuningConfig:
    """Key/value prefixes of `num_virtual_tokens` positions in every attention layer."""

    num_virtual_tokens: int = field(default=20, metadata={"help": "prefix length P"})
    encoder_hidden_size: int | None = field(
        default=None,
        metadata={
            "help": "train the prefix through an MLP of this width (Li and Liang's "
            "reparameterisation, folded away when saving); None trains the prefix directly"
        },
    )

    def __post_init__(self) -> None:
        vt.check_num_virtual_tokens(self.num_virtual_tokens)
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ConfigError(
                f"encoder_hidden_size must be at least 1 (or None), got {self.encoder_hidden_size}."
            )


def _fill(cache: Any, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write the prefix into an empty cache through its public update()."""
    target = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    for index, (keys, values) in enumerate(prefix):
        target.update(keys, values, index)


def _new_cache(config: Any) -> Any:
    """The cache the model itself would make: an EncoderDecoderCache for encoder-decoders."""
    if getattr(config, "is_encoder_decoder", False):
        return EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
    return DynamicCache(config=config)


def _checkpointing(model: nn.Module) -> bool:
    """True while the model trains with activation (gradient) checkpointing."""
    active = getattr(model, "is_activation_checkpointing", None)
    if active is None:
        active = getattr(model, "is_gradient_checkpointing", False)
    return bool(active) and model.training and torch.is_grad_enabled()


def _self_attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention modules that read the prefix from the cache (decoder side, no cross)."""
    root = model.get_decoder() if model.config.is_encoder_decoder else model
    return [
        module
        for module in root.modules()
        if isinstance(getattr(module, "layer_idx", None), int)
        and vt.accepts(module, "cache")
        and not getattr(module, "is_cross_attention", False)
    ]


def _checkpointing_hooks(wrapper: vt.VirtualTokenModel) -> None:
    """Keep the prefix under gradient checkpointing, where transformers' checkpointed layers pass
    no cache to their attention: each self-attention then gets a one-layer cache holding its
    prefix, made from the parameters on every call, so the backward pass's recomputation rebuilds
    the same one."""
    base = wrapper.base_model

    def before(module: nn.Module, args: tuple, kwargs: vt.Kwargs) -> Any:
        cross = kwargs.get("key_value_states") is not None
        if kwargs.get("cache") is not None or cross or not _checkpointing(base):
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        keys, values = wrapper.virtual.key_values(hidden.shape[0], hidden.dtype)[module.layer_idx]
        cache = DynamicCache()
        cache.update(keys, values, module.layer_idx)
        return args, {**kwargs, "cache": cache}

    for module in _self_attention_modules(base):
        wrapper.add_hooks(module, before, None)


def _hooks(wrapper: vt.VirtualTokenModel) -> None:
    """A pre-hook that puts the prefix into the cache of each call that starts a sequence."""
    base = wrapper.base_model
    count = wrapper.num_virtual_tokens
    config = vt.text_config(base)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    mask_key = "decoder_attention_mask" if encoder_decoder else "attention_mask"
    ids_key = "decoder_input_ids" if encoder_decoder else "input_ids"
    records: list[vt.CallRecord] = []

    def before(module: nn.Module, args: tuple, kwargs: vt.Kwargs) -> tuple[tuple, vt.Kwargs]:
        kw = vt.named_arguments(module, args, kwargs)
        cache = kw.get("cache")
        past = vt.cache_length(cache)
        mask = kw.get(mask_key)
        drop = False
        if not encoder_decoder:
            batch, length = vt.sequence_shape(kw, ids_key, "inputs_embeds")
            real_total = mask.shape[1] if mask is not None else max(past - count, 0) + length
            vt.check_length(config, count, real_total)
            positions = vt.shift_positions(module, kw, length, count)
            if positions is not None:
                kw["position_ids"] = positions
        else:
            batch = _decoder_batch(kw)
        if past == 0:
            if cache is None:
                cache = _new_cache(module.config)
                use_cache = kw.get("use_cache")
                if use_cache is None:
                    use_cache = getattr(config, "use_cache", True)
                drop = not use_cache
            dtype = module.get_input_embeddings().weight.dtype
            _fill(cache, wrapper.virtual.key_values(batch, dtype))
            kw["cache"] = cache
        if mask is not None:
            kw[mask_key] = vt.with_ones(mask, count)
        records.append(vt.CallRecord(0, 0, drop_cache=drop))
        return (), kw

    def after(module: nn.Module, args: tuple, kwargs: vt.Kwargs, output: Any) -> Any:
        return vt.strip_output(output, records.pop())

    wrapper.add_hooks(base, before, after)


def _decoder_batch(kwargs: vt.Kwargs) -> int:
    """The batch size of an encoder-decoder call, from whichever input it carries."""
    for key in (
        "decoder_input_ids",
        "decoder_inputs_embeds",
        "labels",
        "input_ids",
        "inputs_embeds",
    ):
        if kwargs.get(key) is not None:
            return kwargs[key].shape[0]
    encoder_outputs = kwargs.get("encoder_outputs")
    if encoder_outputs is not None:
        return encoder_outputs[0].shape[0]
    raise DataError("The call carries no inputs to take a batch size from.")


def apply(model: nn.Module, config: PrefixTuningConfig) -> vt.VirtualTokenModel:
    """Freeze the model and wrap it with trainable key/value prefixes (a new task head trains)."""
    shape = layout(model)
    prefix = PrefixEncoder(config.num_virtual_tokens, shape, config.encoder_hidden_size)
    device = model.get_input_embeddings().weight.device
    wrapper = vt.VirtualTokenModel(model, prefix.to(device), config.num_virtual_tokens)
    _hooks(wrapper)
    _checkpointing_hooks(wrapper)
    return wrapper


def state_dict(model: vt.VirtualTokenModel) -> dict[str, Any]:
    """The prefix with any MLP folded in, under PEFT's key, plus a new task head."""
    with torch.no_grad():
        rows = model.virtual().detach()
    return {"prompt_embeddings": rows, **vt.head_state(model)}


def load_state_dict(model: vt.VirtualTokenModel, tensors: dict[str, Any]) -> None:
    """Load a folded prefix written by state_dict or by PEFT (the MLP, if any, is folded first)."""
    if "prompt_embeddings" not in tensors:
        raise AdapterError("The adapter has no 'prompt_embeddings' tensor: not a prefix file.")
    if model.virtual.transform is not None:
        model.virtual.fold()
    with torch.no_grad():
        model.virtual.embedding.weight.copy_(tensors["prompt_embeddings"])
    vt.load_head_state(model, tensors)


def fold(model: vt.VirtualTokenModel) -> vt.VirtualTokenModel:
    """Fold the reparameterisation MLP into the prefix it produces; the outputs do not change."""
    model.virtual.fold()
    return model


def remove(model: vt.VirtualTokenModel) -> nn.Module:
    """Detach the hooks and give back the base model."""
    return model.remove_hooks()


def merge(model: vt.VirtualTokenModel) -> nn.Module:
    """Refuse: a prefix is extra attention positions, not a weight change."""
    raise AdapterError(
        "Prefix tuning cannot be merged: the prefix adds key/value positions to every attention "
        "layer rather than changing any weight. Save the adapter (peftkit.save) and load it onto "
        "the base model instead."
    )


def adapter_config(model: vt.VirtualTokenModel, config: PrefixTuningConfig) -> dict[str, Any]:
    """PEFT's PREFIX_TUNING adapter_config.json; the saved prefix is folded, so no projection."""
    shape = model.virtual.layout
    heads = task_head_modules(model.base_model)
    peft_config = peft.PrefixTuningConfig(
        task_type=task_type(model.base_model),
        num_virtual_tokens=config.num_virtual_tokens,
        token_dim=shape.token_dim,
        num_transformer_submodules=shape.submodules,
        num_attention_heads=shape.num_heads,
        num_layers=shape.num_layers,
        encoder_hidden_size=config.encoder_hidden_size or shape.token_dim,
        prefix_projection=False,
        modules_to_save=heads or None,
        inference_mode=True,
    )
    return {k: getattr(v, "value", v) for k, v in peft_config.to_dict().items()}


def config_from_adapter(saved: dict[str, Any]) -> PrefixTuningConfig:
    """Our config from a PREFIX_TUNING adapter_config.json (the stored prefix is already folded)."""
    if saved.get("prefix_projection") and not saved.get("inference_mode", True):
        raise AdapterError(
            "This prefix adapter stores an unfolded MLP (prefix_projection with inference_mode "
            "off), which PEFT itself cannot read back either; save it folded."
        )
    return PrefixTuningConfig(num_virtual_tokens=saved["num_virtual_tokens"])


PREFIX_TUNING = Method(
    name="prefix_tuning",
    config_cls=PrefixTuningConfig,
    apply=apply,
    state_dict=state_dict,
    load_state_dict=load_state_dict,
    merge=merge,
    remove=remove,
    switch_off=vt.switch_off,
    peft_type="PREFIX_TUNING",
    adapter_config=adapter_config,
    config_from_adapter=config_from_adapter,
    check_loaded=vt.check_loaded,
    description="trainable key/value prefixes in every attention layer (PEFT's file format)",
)
