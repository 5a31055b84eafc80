"""The LoRA family through HF PEFT: LoRA, rsLoRA and DoRA, their records and what they share.

- LoRA (Hu et al., 2021): W' = W + (alpha / r) * B A, with B zero at the start.
- rsLoRA (Kalajdzievski, 2023): scaled by alpha / sqrt(r), so higher ranks keep learning.
- DoRA (Liu et al., 2024): W' = m * (W + BA) / ||W + BA||_c; LoRA moves the direction, m trains.

The family's parts, each a file of this package: fast.py and down.py (peftkit's faster forward on
PEFT's layers), init.py and loftq.py (how A and B start: the INIT option), plus.py (LoRA+: the
LORA_PLUS option), rows.py and mixed_batch.py (a different adapter per batch row, for serving),
compose.py (several adapters on one base, combined: the COMPOSITION capability), convert.py
(PiSSA/OLoRA adapters rewritten for the original base)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import peft
from torch import nn

from peftkit.errors import AdapterError
from peftkit.method import Composition, Method
from peftkit.methods.lora import compose
from peftkit.methods.lora import fast as lora_fast
from peftkit.methods.lora.convert import CONVERSION, needs_conversion
from peftkit.methods.lora.init import INIT, INITS, check_init_name, init_from_saved, peft_options
from peftkit.methods.lora.plus import EMBEDDING_KEY, EMBEDDING_LR, LORA_PLUS, LORAPLUS_KEY
from peftkit.methods.lora.rows import ROW_ADAPTERS
from peftkit.methods.peft_tuners.base import (
    PEFT_FIELDS_HELP,
    build_peft_config,
    check_saved_fields,
    load_state_dict,
    saved_peft_fields,
    state_dict,
    switch_off,
)
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
        metadata={
            "help": "LoRA+: B's (and 1-D tensors', DoRA's magnitudes included) learning rate as "
            "this multiple of A's (16 suggested)"
        },
    )
    loraplus_lr_embedding: float = field(
        default=EMBEDDING_LR,
        metadata={"help": "LoRA+: the learning rate of LoRA on embedding layers (A and B)"},
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
    peft_fields: dict[str, Any] | None = field(
        default=None, hash=False, metadata={"help": PEFT_FIELDS_HELP}
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
        if not self.loraplus_lr_embedding > 0:
            raise ValueError(
                f"loraplus_lr_embedding must be positive, got {self.loraplus_lr_embedding}."
            )


def peft_config(model: nn.Module, config: LoraConfig) -> peft.LoraConfig:
    """The PEFT LoraConfig for a model: validated targets, task type, the new head to train."""
    targets = config.target_modules if config.target_modules is not None else None
    matched = resolve_targets(model, targets)  # raises with the list of what exists
    spec = targets if targets is not None else default_targets(model)
    modules = dict(model.named_modules())
    options = {
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": spec,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        **peft_options(config),
        "task_type": task_type(model),
        "modules_to_save": task_head_modules(model) or None,
        # GPT-2's Conv1D stores weights transposed; PEFT must know or its merge is wrong.
        "fan_in_fan_out": any(type(modules[name]).__name__ == "Conv1D" for name in matched),
    }
    return build_peft_config(peft.LoraConfig, options, config)


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


# The adapter_config.json keys LoraConfig's own fields (and its options) read; PEFT's others
# travel in peft_fields.
NAMED_KEYS = frozenset(
    {"r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora",
     "init_lora_weights", "loftq_config", "eva_config", LORAPLUS_KEY, EMBEDDING_KEY,
     lora_fast.FAST_PATH_KEY}
)  # fmt: skip


def config_from_adapter(saved: dict[str, Any]) -> LoraConfig:
    """Our config from a PEFT LoRA adapter_config.json (written by peftkit or by PEFT): every
    other field PEFT saved (alpha_pattern, bias, modules_to_save, ...) kept in peft_fields."""
    return LoraConfig(
        rank=saved["r"],
        alpha=saved["lora_alpha"],
        dropout=saved.get("lora_dropout", 0.0),
        target_modules=saved.get("target_modules"),
        use_rslora=saved.get("use_rslora", False),
        use_dora=saved.get("use_dora", False),
        **init_from_saved(saved),
        peft_fields=saved_peft_fields(saved, peft.LoraConfig, NAMED_KEYS),
    )


def check_loaded(model: peft.PeftModel, saved: dict[str, Any]) -> None:
    """Refuse, by name, a saved field the loaded model's PEFT config does not carry."""
    check_saved_fields(
        model, saved, own=frozenset({LORAPLUS_KEY, EMBEDDING_KEY, lora_fast.FAST_PATH_KEY})
    )


def check_combinable(saved: dict[str, Any]) -> None:
    """Refuse an adapter that cannot share the plain base with others (LoftQ's belongs to its
    quantised base); PiSSA/OLoRA ones need converting first (CONVERSION), as combine does."""
    if saved.get("init_lora_weights") == "loftq":
        raise AdapterError(
            "an adapter initialised with LoftQ belongs to its quantised base and does not "
            "combine with adapters of the full-precision base; merge it on its own instead."
        )


def rank_once_loaded(saved: dict[str, Any]) -> int:
    """The rank an adapter has once loaded: PiSSA/OLoRA ones double when converted."""
    rank = int(saved["r"])
    return 2 * rank if needs_conversion(saved) else rank


COMPOSITION = Composition(
    how=compose.COMBINATIONS,
    equal_ranks=frozenset(compose.NEEDS_EQUAL_RANKS),
    check_source=check_combinable,
    rank=rank_once_loaded,
    check_density=compose.check_density,
    load=compose.load_adapters,
    names=compose.adapter_names,
    activate=compose.set_active,
    combine=compose.combine,
    delete=lambda model, name: model.delete_adapter(name),
    save=compose.save_adapter,
)


@dataclass(frozen=True)
class RsLoraConfig(LoraConfig):
    """LoRA with the rank-stabilised scale alpha / sqrt(r)."""

    use_rslora: bool = field(default=True, metadata={"help": "scale by alpha / sqrt(r)"})


@dataclass(frozen=True)
class DoraConfig(LoraConfig):
    """LoRA with weight decomposition into magnitude and direction."""

    use_dora: bool = field(default=True, metadata={"help": "DoRA magnitude/direction split"})


def lora_method(name: str, config_cls: type, description: str) -> Method:
    """A Method record over the LoRA functions above (shared by LoRA, rsLoRA and DoRA), with
    its options: how A and B start (INIT), B's learning rate (LORA_PLUS) and whether
    peftkit's fast forward runs (FAST_PATH)."""
    return Method(
        name=name,
        config_cls=config_cls,
        apply=apply,
        state_dict=state_dict,
        load_state_dict=load_state_dict,
        merge=merge,
        remove=remove,
        peft_type="LORA",
        adapter_config=adapter_config,
        config_from_adapter=config_from_adapter,
        description=description,
        row_adapters=ROW_ADAPTERS,
        options=(INIT, LORA_PLUS, lora_fast.FAST_PATH),
        switch_off=switch_off,
        composition=COMPOSITION,
        conversion=CONVERSION,
        check_loaded=check_loaded,
    )


LORA = lora_method("lora", LoraConfig, "low-rank update B A on chosen linear layers (HF PEFT)")
RSLORA = lora_method("rslora", RsLoraConfig, "LoRA scaled by alpha / sqrt(r) (HF PEFT)")
DORA = lora_method("dora", DoraConfig, "LoRA on the direction plus a trained magnitude (HF PEFT)")
