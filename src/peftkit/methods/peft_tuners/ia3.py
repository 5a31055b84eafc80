"""(IA)^3 (Liu et al., 2022, the T-Few paper) through HF PEFT: learned vectors rescale the
attention's keys and values and the feed-forward network's intermediate activation.

A vector l on a key or value projection multiplies its output elementwise (l * (W x)); on a
feed-forward module it multiplies the module's *input* (W (l * x)), so it must sit on the second
feed-forward projection, whose input is the intermediate activation. Every vector starts at 1:
the model is unchanged at initialisation, and merging scales W's rows (outputs) or columns
(inputs) by l.

Which module is "feed-forward" is a per-family fact (targeting.FEED_FORWARD_DOWN). HF PEFT's own
defaults get some families wrong, so peftkit resolves the targets itself and hands PEFT full
module names: PEFT's BERT entry `output.dense` also matches the attention's output projection
(`attention.output.dense`), so its input (the attention context) is rescaled too; its Qwen2 entry
rescales queries instead of keys (`q_proj`). PEFT requires the feed-forward modules to be among
the targets; peftkit checks that itself and says which are not."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import peft
from torch import nn

from peftkit.errors import AdapterError, TargetError
from peftkit.methods.peft_tuners import base as peft_tuner
from peftkit.targeting import (
    feed_forward_down,
    key_value_targets,
    linear_module_names,
    matches,
    resolve_targets,
)


@dataclass(frozen=True)
class IA3Config:
    """(IA)^3: rescaling vectors on keys, values and the feed-forward intermediate activation."""

    target_modules: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "module names (suffix match), a regex (full match), or 'all-linear'; "
            "default: the architecture's key and value projections and its second "
            "feed-forward projection, as in the paper"
        },
    )
    feedforward_modules: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "targeted modules whose input (not output) is rescaled; they must be "
            "among target_modules; default: the architecture's second feed-forward projection"
        },
    )
    peft_fields: dict[str, Any] | None = field(
        default=None, hash=False, metadata={"help": peft_tuner.PEFT_FIELDS_HELP}
    )


def resolve(model: nn.Module, config: IA3Config) -> tuple[list[str], list[str]]:
    """Full names of the targeted modules and of those among them treated as feed-forward."""
    if config.target_modules is None:
        chosen = set(resolve_targets(model, key_value_targets(model)) + feed_forward_down(model))
    else:
        chosen = set(resolve_targets(model, config.target_modules))
    names = linear_module_names(model)
    targeted = [name for name in names if name in chosen]  # in the model's order
    if config.feedforward_modules is None:
        return targeted, [name for name in feed_forward_down(model) if name in chosen]
    spec = config.feedforward_modules
    feedforward = [name for name in names if matches(name, spec)]
    if spec and not feedforward:
        raise TargetError(
            f"feedforward_modules {spec!r} matched no linear layer of this model; it names "
            "targeted modules whose input (the feed-forward activation) the vectors rescale."
        )
    outside = [name for name in feedforward if name not in chosen]
    if outside:
        raise TargetError(
            f"feedforward_modules must be among target_modules (HF PEFT's rule): "
            f"{len(outside)} are not targeted, such as {outside[0]}. Add them to target_modules "
            "or leave them out of feedforward_modules."
        )
    return targeted, feedforward


def peft_config(model: nn.Module, config: IA3Config) -> peft.IA3Config:
    """PEFT's IA3Config for a model: full module names, feed-forward ones among them."""
    targeted, feedforward = resolve(model, config)
    _, conv1d = peft_tuner.targets(model, targeted)
    options = {
        "target_modules": targeted,
        "feedforward_modules": feedforward,
        # GPT-2's Conv1D stores weights transposed; PEFT must know or its merge is wrong.
        "fan_in_fan_out": conv1d,
        **peft_tuner.common_options(model),
    }
    return peft_tuner.build_peft_config(peft.IA3Config, options, config)


def config_from_adapter(saved: dict[str, Any]) -> IA3Config:
    """Our config from a PEFT IA3 adapter_config.json (written by peftkit or by PEFT)."""
    return IA3Config(
        target_modules=saved.get("target_modules"),
        feedforward_modules=saved.get("feedforward_modules") or [],
        peft_fields=peft_tuner.saved_peft_fields(
            saved, peft.IA3Config, frozenset({"target_modules", "feedforward_modules"})
        ),
    )


def check_loaded(model: peft.PeftModel, saved: dict[str, Any]) -> None:
    """Refuse, by name, a saved field the loaded model does not honour; feedforward_modules by
    the layers it chooses (peftkit hands PEFT full names where the file may hold suffixes)."""
    peft_tuner.check_saved_fields(model, saved, own=frozenset({"feedforward_modules"}))
    spec = saved.get("feedforward_modules") or []
    prefix = "base_model.model."
    layers = {
        name.removeprefix(prefix): module
        for name, module in model.named_modules()
        if hasattr(module, "is_feedforward")
    }
    wanted = {name for name in layers if spec and matches(name, spec)}
    built = {name for name, module in layers.items() if module.is_feedforward}
    if wanted != built:
        raise AdapterError(
            f"adapter_config.json's field 'feedforward_modules' = {spec!r} is not honoured: it "
            f"chooses {sorted(wanted)}, the loaded model rescales the input of {sorted(built)}."
        )


IA3 = peft_tuner.peft_method(
    "ia3",
    IA3Config,
    "IA3",
    peft_config,
    config_from_adapter,
    "vectors rescaling keys, values and the feed-forward activation, starting at 1 (HF PEFT)",
    check_loaded=check_loaded,
)
