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

from peftkit.methods.peft_tuners import base as peft_tuner
from peftkit.methods.peft_tuners.lycoris import LycorisConfig, options_from_adapter, peft_options


@dataclass(frozen=True)
class LoKrConfig(LycorisConfig):
    """Kronecker product updates of chosen linear layers (r: the rank of the larger factor W2)."""

    decompose_factor: int = field(
        default=-1,
        metadata={"help": "largest size of the small factor W1's sides; -1: near square roots"},
    )
    decompose_both: bool = field(
        default=False, metadata={"help": "make W1 a rank-r product as well"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ValueError(
                f"decompose_factor must be -1 (automatic) or a positive size, got "
                f"{self.decompose_factor}."
            )


def peft_config(model: nn.Module, config: LoKrConfig) -> peft.LoKrConfig:
    """PEFT's LoKrConfig for a model: targets checked to exist and to be Linear."""
    options = {
        "decompose_factor": config.decompose_factor,
        "decompose_both": config.decompose_both,
        **peft_options(model, config, "LoKr"),
    }
    return peft_tuner.build_peft_config(peft.LoKrConfig, options, config)


def config_from_adapter(saved: dict[str, Any]) -> LoKrConfig:
    """Our config from a PEFT LoKr adapter_config.json (written by peftkit or by PEFT)."""
    return LoKrConfig(
        decompose_factor=saved.get("decompose_factor", -1),
        decompose_both=saved.get("decompose_both", False),
        **options_from_adapter(
            saved, peft.LoKrConfig, frozenset({"decompose_factor", "decompose_both"})
        ),
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
