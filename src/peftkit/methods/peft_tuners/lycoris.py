"""What LoHa and LoKr (PEFT's LyCORIS tuners) share: rank, alpha, the two dropouts and the
targets, their checks, the PEFT options they become, and their reading from adapter_config.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from peftkit.methods.peft_tuners import base as peft_tuner


@dataclass(frozen=True)
class LycorisConfig:
    """The options every LyCORIS tuner has; LoHaConfig and LoKrConfig extend it."""

    rank: int = field(default=8, metadata={"help": "rank r of the low-rank factors"})
    alpha: float = field(default=8.0, metadata={"help": "scale numerator: update * alpha / r"})
    rank_dropout: float = field(
        default=0.0, metadata={"help": "dropout over the rank dimension while training"}
    )
    module_dropout: float = field(
        default=0.0, metadata={"help": "probability of skipping a whole adapted layer per step"}
    )
    target_modules: str | list[str] | None = field(
        default=None, metadata={"help": peft_tuner.TARGET_HELP}
    )
    peft_fields: dict[str, Any] | None = field(
        default=None, hash=False, metadata={"help": peft_tuner.PEFT_FIELDS_HELP}
    )

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}.")
        for name in ("rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}.")


def peft_options(model: nn.Module, config: LycorisConfig, method: str) -> dict[str, Any]:
    """The shared keyword arguments of PEFT's LoHaConfig/LoKrConfig, targets checked to exist
    and to be plain Linear layers (PEFT's LyCORIS layers do not wrap GPT-2's Conv1D)."""
    targeted, _ = peft_tuner.targets(model, config.target_modules)
    peft_tuner.refuse_conv1d(model, targeted, method, "lora, ia3 or vera")
    return {
        "r": config.rank,
        "alpha": config.alpha,
        "rank_dropout": config.rank_dropout,
        "module_dropout": config.module_dropout,
        "target_modules": peft_tuner.peft_spec(model, config.target_modules),
        **peft_tuner.common_options(model),
    }


# The adapter_config.json keys LycorisConfig's own fields read.
NAMED_KEYS = frozenset({"r", "alpha", "rank_dropout", "module_dropout", "target_modules"})


def options_from_adapter(
    saved: dict[str, Any], peft_cls: type, named: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """The shared options read back from a PEFT LoHa/LoKr adapter_config.json; PEFT's fields
    that neither they nor `named` (the subclass's own keys) read go to peft_fields."""
    return {
        "rank": saved["r"],
        "alpha": saved["alpha"],
        "rank_dropout": saved.get("rank_dropout", 0.0),
        "module_dropout": saved.get("module_dropout", 0.0),
        "target_modules": saved.get("target_modules"),
        "peft_fields": peft_tuner.saved_peft_fields(saved, peft_cls, NAMED_KEYS | named),
    }
