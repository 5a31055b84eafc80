"""Virtual tokens on transformers' public interfaces, shared by prompt tuning and prefix tuning.

Both methods put P learned positions in front of every sequence: prompt tuning as input
embeddings, prefix tuning as keys and values already sitting in the KV `Cache`. Neither copies a
transformers forward. The base model is wrapped in `VirtualTokenModel` and a forward pre-hook on
the base model rewrites each call's keyword arguments (the mask, the position ids, the cache or
the input embeddings); a forward hook tidies the output. Because the hook sits on the base model
itself, `generate()` works unchanged: transformers' own decoding loop calls the base model, and the
hook sees each step.

The rule that makes generation right: a call whose cache is absent or empty starts a sequence, so
the virtual tokens go in; a call with a non-empty cache continues one whose cache already holds
them, so only the attention mask (and the position ids) move by P. Real tokens sit at positions
P, P+1, ... counted over non-padding tokens, as in PEFT's own forward, so a left-padded batch gets
the same positions in a forward pass as in `generate()`."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit import io
from peftkit.errors import AdapterError, ConfigError, DataError, TargetError
from peftkit.method import adapter_files
from peftkit.targeting import max_positions, task_head_modules

# Call keyword arguments a pre-hook rewrites, as one mutable dict.
Kwargs = dict[str, Any]


@dataclass
class CallRecord:
    """What a pre-hook did to one call, so the post-hook can undo it in the output."""

    prepended: int  # positions put in front of the sequence (prompt tuning's fresh calls)
    input_length: int  # the caller's sequence length
    drop_cache: bool  # the hook made a cache the caller did not ask for


class VirtualTokenModel(nn.Module):
    """A transformers model, frozen, plus trainable virtual tokens; behaves like the model it wraps.

    `forward` takes the usual batch and `generate` is the base model's own. Attribute reads that
    the wrapper does not answer (`config`, `generation_config`, `device`, ...) go to the base."""

    def __init__(self, base_model: nn.Module, virtual: nn.Module, num_virtual_tokens: int) -> None:
        super().__init__()
        self._requires_grad_before = freeze_base(base_model)
        self.base_model = base_model
        self.virtual = virtual
        self.num_virtual_tokens = num_virtual_tokens
        self.adapter_enabled = True
        self._hook_handles: list[Any] = []

    def forward(self, *args: Any, labels: Any = None, **kwargs: Any) -> Any:
        """The base model's forward; the hooks add the virtual tokens.

        `labels` is named so that transformers.Trainer, which reads label names off the
        forward signature, finds it."""
        if labels is not None:
            kwargs["labels"] = labels
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's generate(); the hooks add the virtual tokens on the first step."""
        return self.base_model.generate(*args, **kwargs)

    def save_pretrained(self, folder: str | Any) -> Any:
        """Save the adapter, as PEFT's PeftModel does (not the base model, which the attribute
        fallback below would otherwise reach)."""
        return io.write_folder_atomically(folder, adapter_files(self))

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (with the hooks still attached)."""
        return self.base_model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the plain base model inside the block (as PEFT's PeftModel.disable_adapter).

        Switch only between calls: a generation started with the virtual tokens has them in its
        cache."""
        previous, self.adapter_enabled = self.adapter_enabled, False
        try:
            yield
        finally:
            self.adapter_enabled = previous

    def add_hooks(self, module: nn.Module, before: Callable, after: Callable | None) -> None:
        """Register a keyword pre-hook (and optionally a post-hook) on a module of the base;
        both do nothing while the adapter is disabled."""

        def gated_before(hooked: nn.Module, args: tuple, kwargs: Kwargs) -> Any:
            return before(hooked, args, kwargs) if self.adapter_enabled else None

        def gated_after(hooked: nn.Module, args: tuple, kwargs: Kwargs, output: Any) -> Any:
            return after(hooked, args, kwargs, output) if self.adapter_enabled else None

        self._hook_handles.append(module.register_forward_pre_hook(gated_before, with_kwargs=True))
        if after is not None:
            self._hook_handles.append(module.register_forward_hook(gated_after, with_kwargs=True))

    def remove_hooks(self) -> nn.Module:
        """Detach every hook, unfreeze what was trainable before, give back the base model."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        parameters = dict(self.base_model.named_parameters(remove_duplicate=False))
        for name, flag in self._requires_grad_before.items():
            parameters[name].requires_grad_(flag)
        return self.base_model


def check_num_virtual_tokens(value: int) -> None:
    """Refuse fewer than one virtual token."""
    if value < 1:
        raise ConfigError(f"num_virtual_tokens must be at least 1, got {value}.")


def named_arguments(module: nn.Module, args: tuple, kwargs: Kwargs) -> Kwargs:
    """All call arguments by name (positional ones bound to the forward's parameter names)."""
    kwargs = dict(kwargs)
    if args:
        names = [
            name
            for name, parameter in inspect.signature(module.forward).parameters.items()
            if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
        ]
        kwargs.update(zip(names, args, strict=False))
    if "past_key_values" in kwargs:  # the pre-5.24 name; transformers renames it, so do we
        kwargs["cache"] = kwargs.pop("past_key_values")
    return kwargs


def accepts(module: nn.Module, name: str) -> bool:
    """True when the module's forward names this parameter (as generate() itself checks)."""
    return name in inspect.signature(module.forward).parameters


def cache_length(cache: Any) -> int:
    """How many positions a cache already holds (0 for no cache)."""
    return 0 if cache is None else int(cache.get_seq_length())


def real_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over non-padding tokens, exactly as generate() makes them."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 0)


def with_ones(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The mask with `count` attended positions in front."""
    return torch.cat([mask.new_ones(mask.shape[0], count), mask], dim=1)


def check_length(config: Any, num_virtual: int, total: int) -> None:
    """Refuse a sequence that runs past the position table once the virtual tokens are added."""
    limit = max_positions(config)
    if limit is not None and total + num_virtual > limit:
        raise DataError(
            f"The input is {total} tokens and the {num_virtual} virtual tokens make it "
            f"{total + num_virtual}, beyond this model's maximum of {limit} positions. Truncate "
            f"inputs to at most {limit - num_virtual} tokens (or use fewer virtual tokens)."
        )


def shift_positions(
    module: nn.Module, kwargs: Kwargs, length: int, num_virtual: int, key: str = "position_ids"
) -> torch.Tensor | None:
    """Position ids of the call's real tokens, moved past the virtual ones (None: model default).

    Given ids (generate() passes them, counted from 0 over real tokens) move by P; without them
    they are derived from the attention mask, so padding never shifts a row's positions."""
    if not accepts(module, key):
        return None
    given = kwargs.get(key)
    if given is not None:
        return given + num_virtual
    mask = kwargs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return None
    return real_positions(mask)[:, -length:] + num_virtual


def sequence_shape(kwargs: Kwargs, ids_key: str, embeds_key: str) -> tuple[int, int]:
    """(batch size, sequence length) of a call, from its ids or its embeddings."""
    ids = kwargs.get(ids_key)
    if ids is not None:
        return ids.shape[0], ids.shape[1]
    embeds = kwargs.get(embeds_key)
    if embeds is None:
        raise DataError(f"The call has neither {ids_key} nor {embeds_key}: nothing to run on.")
    return embeds.shape[0], embeds.shape[1]


def strip_output(output: Any, record: CallRecord) -> Any:
    """Drop virtual positions from token-level logits and a cache the caller did not ask for."""
    logits = getattr(output, "logits", None)
    if (
        record.prepended
        and isinstance(logits, torch.Tensor)
        and logits.dim() == 3
        and logits.shape[1] == record.prepended + record.input_length
    ):
        output.logits = logits[:, record.prepended :]
    if record.drop_cache and getattr(output, "cache", None) is not None:
        # A ModelOutput keeps fields in a dict that setting None does not clear: rebuild it.
        output = type(output)(**{k: v for k, v in output.items() if k != "cache"})
    return output


def freeze_base(model: nn.Module) -> dict[str, bool]:
    """Freeze every base weight except a freshly initialised task head; return the flags before."""
    before = {name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)}
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name in task_head_modules(model):
        for parameter in getattr(model, name).parameters():
            parameter.requires_grad_(True)
    return before


def head_state(wrapper: VirtualTokenModel) -> dict[str, torch.Tensor]:
    """The trainable task head under PEFT's key names (`base_model.classifier.weight`, ...)."""
    heads = task_head_modules(wrapper.base_model)
    return {
        f"base_model.{head}.{name}": tensor.detach()
        for head in heads
        for name, tensor in getattr(wrapper.base_model, head).state_dict().items()
    }


def load_head_state(wrapper: VirtualTokenModel, tensors: dict[str, torch.Tensor]) -> None:
    """Load the task head written by head_state (or by PEFT)."""
    for head in task_head_modules(wrapper.base_model):
        module = getattr(wrapper.base_model, head)
        prefix = f"base_model.{head}."
        found = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if found:
            module.load_state_dict(found, strict=True)


def check_loaded(model: VirtualTokenModel, saved: dict[str, Any]) -> None:
    """Refuse, by name, a saved modules_to_save beyond the task head that prompt and prefix
    tuning train here (PEFT's adapter may also train, say, an lm_head, which peftkit's virtual
    tokens would not load): the one PEFT field of these methods that changes what the weights
    compute and that the tensors alone would report as a base model that does not fit."""
    heads = set(task_head_modules(model.base_model))
    wanted = saved.get("modules_to_save") or []
    extra = [name for name in wanted if name not in heads]
    if extra:
        raise AdapterError(
            f"adapter_config.json's modules_to_save {wanted!r} trains {extra}, which peftkit's "
            f"{str(saved.get('peft_type', '')).lower()} does not load (it trains the task head "
            f"only: {sorted(heads) or 'none on this model'}); load it with "
            "peft.PeftModel.from_pretrained instead."
        )


def text_config(model: nn.Module) -> Any:
    """The model's config (its text part, for models that have one)."""
    config = getattr(model, "config", None)
    if config is None:
        raise TargetError(
            f"{type(model).__name__} has no transformers config: virtual-token methods need a "
            "transformers model (loaded with peftkit.load_model or from_pretrained)."
        )
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def switch_off(model: Any) -> Callable[[], Any]:
    """The Method.switch_off capability: the wrapper's own disable_adapter (hooks gated off)."""
    return model.disable_adapter
