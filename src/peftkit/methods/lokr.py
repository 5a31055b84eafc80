"""LoKr (LyCORIS; Yeh et al., 2024, "Navigating Text-To-Image Customization") through HF PEFT:
the update is a Kronecker product, dW = (alpha / r) W1 (x) W2.

W (d_out x d_in) is factored as d_out = l k, d_in = m n with l, m no larger than `decompose_factor`
(-1: as close to square roots as the sizes allow); W1 is l x m, W2 is k x n, itself a rank-r
product B A when r is below half its larger side. A Kronecker product of ranks a and b has rank
a b, so LoKr reaches a high rank with very few parameters. PEFT starts W1 at zero (W2 random), so
dW = 0 and the model is unchanged at initialisation. Mergeable. PEFT's LyCORIS layers wrap
torch.nn.Linear only: GPT-2's Conv1D layers are refused with a message."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import peft
from torch import nn

from peftkit.methods import peft_tuner


@dataclass(frozen=True)
class LoKrConfig:
    """Kronecker product updates of chosen linear layers."""

    rank: int = field(default=8, metadata={"help": "rank r of the larger Kronecker factor W2"})
    alpha: float = field(default=8.0, metadata={"help": "scale numerator: update * alpha / r"})
    decompose_factor: int = field(
        default=-1,
        metadata={"help": "largest size of the small factor W1's sides; -1: near square roots"},
    )
    decompose_both: bool = field(
        default=False, metadata={"help": "make W1 a rank-r product as well"}
    )
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
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ValueError(
                f"decompose_factor must be -1 (automatic) or a positive size, got "
                f"{self.decompose_factor}."
            )
        for name in ("rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}.")


def peft_config(model: nn.Module, config: LoKrConfig) -> peft.LoKrConfig:
    """PEFT's LoKrConfig for a model: targets checked to exist and to be Linear."""
    targeted, _ = peft_tuner.targets(model, config.target_modules)
    peft_tuner.refuse_conv1d(model, targeted, "LoKr", "lora, ia3 or vera")
    return peft.LoKrConfig(
        r=config.rank,
        alpha=config.alpha,
        decompose_factor=config.decompose_factor,
        decompose_both=config.decompose_both,
        rank_dropout=config.rank_dropout,
        module_dropout=config.module_dropout,
        target_modules=targeted,
        **peft_tuner.common_options(model),
    )


def config_from_adapter(saved: dict[str, Any]) -> LoKrConfig:
    """Our config from a PEFT LoKr adapter_config.json (written by peftkit or by PEFT)."""
    return LoKrConfig(
        rank=saved["r"],
        alpha=saved["alpha"],
        decompose_factor=saved.get("decompose_factor", -1),
        decompose_both=saved.get("decompose_both", False),
        rank_dropout=saved.get("rank_dropout", 0.0),
        module_dropout=saved.get("module_dropout", 0.0),
        target_modules=saved.get("target_modules"),
    )


LOKR = peft_tuner.peft_method(
    "lokr",
    LoKrConfig,
    "LOKR",
    peft_config,
    config_from_adapter,
    "Kronecker product update on chosen linear layers (HF PEFT)",
    "HF PEFT's LoKr wraps plain Linear layers only, not bitsandbytes' quantised ones",
)
