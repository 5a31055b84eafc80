"""VeRA (Kopiczko et al., 2024, "Vector-based Random Matrix Adaptation") through HF PEFT: one pair
of frozen random matrices A (r x d_in) and B (d_out x r) is shared by every adapted layer; each
layer trains only two scaling vectors, dW = diag(lambda_b) B diag(lambda_d) A.

Per adapted matrix that is r + d_out parameters (LoRA: r (d_in + d_out)), so VeRA affords a
large r (the paper: 256 to 1024). lambda_b starts at zero and lambda_d at `d_initial`, so the
model is unchanged at initialisation. A and B are drawn from a seeded generator
(`projection_seed`); with `save_projection` they are also written into the adapter file, so a
load never depends on the generator. PEFT 0.21 draws A and B at the largest targeted shape and
slices each layer's part, so targeted layers may differ in shape (earlier PEFT required equal
shapes). Mergeable; GPT-2's Conv1D layers work (`fan_in_fan_out` is set for them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import peft
from torch import nn

from peftkit.methods.peft_tuners import base as peft_tuner


@dataclass(frozen=True)
class VeraConfig:
    """Shared frozen random projections, two trained scaling vectors per adapted layer."""

    rank: int = field(default=256, metadata={"help": "rank r of the shared random matrices"})
    d_initial: float = field(
        default=0.1, metadata={"help": "starting value of every entry of lambda_d"}
    )
    dropout: float = field(default=0.0, metadata={"help": "dropout on the VeRA input path"})
    projection_seed: int = field(
        default=0, metadata={"help": "seed of the generator that draws the shared A and B"}
    )
    save_projection: bool = field(
        default=True,
        metadata={"help": "write A and B into the adapter file (else: redrawn from the seed)"},
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
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")


def peft_config(model: nn.Module, config: VeraConfig) -> peft.VeraConfig:
    """PEFT's VeraConfig for a model: targets checked to exist, Conv1D declared."""
    targeted, conv1d = peft_tuner.targets(model, config.target_modules)
    options = {
        "r": config.rank,
        "d_initial": config.d_initial,
        "vera_dropout": config.dropout,
        "projection_prng_key": config.projection_seed,
        "save_projection": config.save_projection,
        "target_modules": peft_tuner.peft_spec(model, config.target_modules),
        # GPT-2's Conv1D stores weights transposed; PEFT must know or its merge is wrong.
        "fan_in_fan_out": conv1d,
        **peft_tuner.common_options(model),
    }
    return peft_tuner.build_peft_config(peft.VeraConfig, options, config)


# The adapter_config.json keys VeraConfig's own fields read.
NAMED_KEYS = frozenset(
    {"r", "d_initial", "vera_dropout", "projection_prng_key", "save_projection", "target_modules"}
)


def config_from_adapter(saved: dict[str, Any]) -> VeraConfig:
    """Our config from a PEFT VeRA adapter_config.json (written by peftkit or by PEFT)."""
    return VeraConfig(
        rank=saved["r"],
        d_initial=saved.get("d_initial", 0.1),
        dropout=saved.get("vera_dropout", 0.0),
        projection_seed=saved.get("projection_prng_key", 0),
        save_projection=saved.get("save_projection", True),
        target_modules=saved.get("target_modules"),
        peft_fields=peft_tuner.saved_peft_fields(saved, peft.VeraConfig, NAMED_KEYS),
    )


VERA = peft_tuner.peft_method(
    "vera",
    VeraConfig,
    "VERA",
    peft_config,
    config_from_adapter,
    "two scaling vectors per layer over shared frozen random matrices (HF PEFT)",
)
