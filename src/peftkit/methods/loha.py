"""LoHa (LyCORIS; Hyeon-Woo et al., 2022, FedPara) through HF PEFT: the update is the Hadamard
(elementwise) product of two low-rank products, dW = (alpha / r) (B1 A1) * (B2 A2).

Each factor has rank r, but their elementwise product can reach rank r^2: a higher effective
rank than LoRA for the same 2 x r (d_in + d_out) parameters per matrix (twice LoRA's count at the
same r). PEFT starts B2 at zero (the others Kaiming-uniform), so dW = 0 and the model is unchanged
at initialisation. Mergeable. PEFT's LyCORIS layers wrap torch.nn.Linear only: GPT-2's Conv1D
layers are refused with a message."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import peft
from torch import nn

from peftkit.methods import peft_tuner


@dataclass(frozen=True)
class LoHaConfig:
    """Low-rank Hadamard product updates of chosen linear layers."""

    rank: int = field(default=8, metadata={"help": "rank r of each of the two low-rank factors"})
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

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}.")
        for name in ("rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}.")


def peft_config(model: nn.Module, config: LoHaConfig) -> peft.LoHaConfig:
    """PEFT's LoHaConfig for a model: targets checked to exist and to be Linear."""
    targeted, _ = peft_tuner.targets(model, config.target_modules)
    peft_tuner.refuse_conv1d(model, targeted, "LoHa", "lora, ia3 or vera")
    return peft.LoHaConfig(
        r=config.rank,
        alpha=config.alpha,
        rank_dropout=config.rank_dropout,
        module_dropout=config.module_dropout,
        target_modules=targeted,
        **peft_tuner.common_options(model),
    )


def config_from_adapter(saved: dict[str, Any]) -> LoHaConfig:
    """Our config from a PEFT LoHa adapter_config.json (written by peftkit or by PEFT)."""
    return LoHaConfig(
        rank=saved["r"],
        alpha=saved["alpha"],
        rank_dropout=saved.get("rank_dropout", 0.0),
        module_dropout=saved.get("module_dropout", 0.0),
        target_modules=saved.get("target_modules"),
    )


LOHA = peft_tuner.peft_method(
    "loha",
    LoHaConfig,
    "LOHA",
    peft_config,
    config_from_adapter,
    "Hadamard product of two low-rank updates on chosen linear layers (HF PEFT)",
    "HF PEFT's LoHa wraps plain Linear layers only, not bitsandbytes' quantised ones",
)
