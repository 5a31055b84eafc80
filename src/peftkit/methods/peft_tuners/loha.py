"""LoHa (LyCORIS; Hyeon-Woo et al., 2022, FedPara) through HF PEFT: the update is the Hadamard
(elementwise) product of two low-rank products, dW = (alpha / r) (B1 A1) * (B2 A2).

Each factor has rank r, but their elementwise product can reach rank r^2: a higher effective
rank than LoRA for the same 2 x r (d_in + d_out) parameters per matrix (twice LoRA's count at the
same r). PEFT starts B2 at zero (the others Kaiming-uniform), so dW = 0 and the model is unchanged
at initialisation. Mergeable. PEFT's LyCORIS layers wrap torch.nn.Linear only: GPT-2's Conv1D
layers are refused with a message."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import peft
from torch import nn

from peftkit.methods.peft_tuners import base as peft_tuner
from peftkit.methods.peft_tuners.lycoris import LycorisConfig, options_from_adapter, peft_options


@dataclass(frozen=True)
class LoHaConfig(LycorisConfig):
    """Low-rank Hadamard product updates of chosen linear layers."""


def peft_config(model: nn.Module, config: LoHaConfig) -> peft.LoHaConfig:
    """PEFT's LoHaConfig for a model: targets checked to exist and to be Linear."""
    return peft_tuner.build_peft_config(
        peft.LoHaConfig, peft_options(model, config, "LoHa"), config
    )


def config_from_adapter(saved: dict[str, Any]) -> LoHaConfig:
    """Our config from a PEFT LoHa adapter_config.json (written by peftkit or by PEFT)."""
    return LoHaConfig(**options_from_adapter(saved, peft.LoHaConfig))


LOHA = peft_tuner.peft_method(
    "loha",
    LoHaConfig,
    "LOHA",
    peft_config,
    config_from_adapter,
    "Hadamard product of two low-rank updates on chosen linear layers (HF PEFT)",
    "HF PEFT's LoHa wraps plain Linear layers only, not bitsandbytes' quantised ones",
)
