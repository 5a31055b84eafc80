"""LoRA (Hu et al., 2021) through HF PEFT: W' = W + (alpha / r) * B A, with B zero at the start.

rsLoRA and DoRA are the same machinery with one PEFT flag each (see rslora.py and dora.py);
this file holds the shared functions and plain LoRA's record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import peft
from torch import nn

from peftkit.method import Method
from peftkit.methods import lora_fast, lora_options
from peftkit.methods.lora_init import INITS, check_init_name, init_from_saved, peft_options
from peftkit.methods.lora_rows import ROW_ADAPTERS
from peftkit.methods.peft_tuner import load_state_dict, state_dict
from peftkit.targeting import default_targets, resolve_targets, task_head_modules, task_type


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adaptation of chosen linear layers."""

    rank: int = field(default=8, metadata={"help": "rank r of the update B A"})
    alpha: float = field(default=16.0, metadata={"help": "scale numerator: update * alpha / r"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA input path"})
    target_modules: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "module names (suffix match), a regex (full match), or 'all-linear'; "
            "default: the architecture's query and value projections"
        },
    )
    init: str = field(
        default="kaiming",
        metadata={
            "help": "how A and B start: " + " | ".join(INITS) + " (docs/methods/lora.md); "
            "pissa, olora and loftq rewrite the adapted base weights"
        },
    )
    loftq_iterations: int = field(
        default=1, metadata={"help": "init loftq: alternations of NF4 quantisation and SVD fit"}
    )
    loraplus_lr_ratio: float | None = field(
        default=None,
        metadata={"help": "LoRA+: B's learning rate as this multiple of A's (16 suggested)"},
    )
    use_rslora: bool = field(default=False, metadata={"help": "scale by alpha / sqrt(r)"})
    use_dora: bool = field(default=False, metadata={"help": "DoRA magnitude/direction split"})
    fast_path: bool = field(
        default=True,
        metadata={
            "help": "peftkit's faster forward on PEFT's LoRA layers (shared A multiplies and "
            "dropout masks for sibling layers); false: PEFT's own forward"
        },
    )

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        check_init_name(self.init)
        if self.loftq_iterations < 1:
            raise ValueError(f"loftq_iterations must be at least 1, got {self.loftq_iterations}.")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio > 0:
            raise ValueError(f"loraplus_lr_ratio must be positive, got {self.loraplus_lr_ratio}.")


def peft_config(model: nn.Module, config: LoraConfig) -> peft.LoraConfig:
    """The PEFT LoraConfig for a model: validated targets, task type, the new head to train."""
    targets = config.target_modules if config.target_modules is not None else None
    matched = resolve_targets(model, targets)  # raises with the list of what exists
    spec = targets if targets is not None else default_targets(model)
    modules = dict(model.named_modules())
    return peft.LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=spec,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        **peft_options(config),
        task_type=task_type(model),
        modules_to_save=task_head_modules(model) or None,
        # GPT-2's Conv1D stores weights transposed; PEFT must know or its merge is wrong.
        fan_in_fan_out=any(type(modules[name]).__name__ == "Conv1D" for name in matched),
    )


def apply(model: nn.Module, config: LoraConfig) -> peft.PeftModel:
    """Wrap the model in a PEFT LoRA model; only LoRA weights (and a new task head) train."""
    tuned = peft.get_peft_model(model, peft_config(model, config))
    if config.fast_path:
        lora_fast.install(tuned)
    return tuned


def merge(model: peft.PeftModel) -> nn.Module:
    """Fold B A into the base weights and return the plain transformers model."""
    lora_fast.uninstall(model)
    return model.merge_and_unload()


def remove(model: peft.PeftModel) -> nn.Module:
    """Take the LoRA layers out again, restoring the base model unchanged."""
    lora_fast.uninstall(model)
    return model.unload()


def adapter_config(model: peft.PeftModel, config: LoraConfig) -> dict[str, Any]:
    """PEFT's own adapter_config.json contents, so peft.PeftModel.from_pretrained reads it."""
    saved = model.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in saved.items()}


def config_from_adapter(saved: dict[str, Any]) -> LoraConfig:
    """Our config from a PEFT LoRA adapter_config.json (written by peftkit or by PEFT)."""
    return LoraConfig(
        rank=saved["r"],
        alpha=saved["lora_alpha"],
        dropout=saved.get("lora_dropout", 0.0),
        target_modules=saved.get("target_modules"),
        use_rslora=saved.get("use_rslora", False),
        use_dora=saved.get("use_dora", False),
        **init_from_saved(saved),
        loraplus_lr_ratio=saved.get(lora_options.LORAPLUS_KEY),
    )


def lora_method(name: str, config_cls: type, description: str) -> Method:
    """A Method record over the LoRA functions above (shared by LoRA, rsLoRA and DoRA)."""
    return Method(
        name=name,
        config_cls=config_cls,
        apply=lora_options.initialising(apply),
        state_dict=state_dict,
        load_state_dict=load_state_dict,
        hooks=lora_options.hooks,
        merge=merge,
        remove=lora_options.restoring(remove),
        peft_type="LORA",
        adapter_config=lora_options.recording(adapter_config),
        config_from_adapter=config_from_adapter,
        description=description,
        row_adapters=ROW_ADAPTERS,
    )


LORA = lora_method("lora", LoraConfig, "low-rank update B A on chosen linear layers (HF PEFT)")
