"""OFT (Qiu et al., 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning") through
HF PEFT: each adapted weight is multiplied by a learned orthogonal matrix, W' = W R, so the angles
between its neurons (its "hyperspherical energy") are kept.

R is block-diagonal: in_features / b blocks of size b, each the Cayley transform
(I + Q)(I - Q)^-1 of a skew-symmetric Q with b (b - 1) / 2 free entries, so a layer trains
in_features (b - 1) / 2 parameters. PEFT 0.21 defaults to a truncated Neumann series for the
inverse (`use_cayley_neumann`, from OFTv2, Qiu et al. 2025): cheaper, near-orthogonal. Q starts
at zero, so R = I and the model is unchanged at initialisation. Mergeable (W R is one matrix).
peftkit refuses a block size that does not divide a targeted layer's input size, where PEFT
would change it with only a warning; PEFT's OFT layers wrap torch.nn.Linear only, so GPT-2's
Conv1D layers are refused with a message."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import peft
from torch import nn

from peftkit.errors import AdapterError, TargetError
from peftkit.methods.peft_tuners import base as peft_tuner


@dataclass(frozen=True)
class OFTConfig:
    """Block-diagonal orthogonal rotations of chosen linear layers' inputs."""

    block_size: int = field(
        default=32,
        metadata={"help": "size b of each orthogonal block; must divide every targeted "
                  "layer's input size; a layer trains in_features (b - 1) / 2 parameters"},
    )  # fmt: skip
    use_cayley_neumann: bool = field(
        default=True,
        metadata={"help": "Neumann-series Cayley transform (fast, near-orthogonal); "
                  "false: the exact inverse"},
    )  # fmt: skip
    num_cayley_neumann_terms: int = field(
        default=5, metadata={"help": "terms of the Neumann series"}
    )
    coft: bool = field(
        default=False, metadata={"help": "constrained OFT: keep R within eps of the identity"}
    )
    eps: float = field(default=6e-5, metadata={"help": "COFT's radius around the identity"})
    block_share: bool = field(
        default=False, metadata={"help": "one block shared by all blocks of a layer"}
    )
    module_dropout: float = field(
        default=0.0, metadata={"help": "probability of setting a block to the identity per step"}
    )
    target_modules: str | list[str] | None = field(
        default=None, metadata={"help": peft_tuner.TARGET_HELP}
    )
    peft_fields: dict[str, Any] | None = field(
        default=None, hash=False, metadata={"help": peft_tuner.PEFT_FIELDS_HELP}
    )

    def __post_init__(self) -> None:
        if self.block_size < 2:
            raise ValueError(f"block_size must be at least 2, got {self.block_size}.")
        if self.num_cayley_neumann_terms < 1:
            raise ValueError(
                f"num_cayley_neumann_terms must be at least 1, got {self.num_cayley_neumann_terms}."
            )
        if not 0.0 <= self.module_dropout < 1.0:
            raise ValueError(f"module_dropout must be in [0, 1), got {self.module_dropout}.")


def check_block_size(model: nn.Module, targeted: list[str], block_size: int) -> None:
    """Refuse a block size that does not divide every targeted layer's input size."""
    modules = dict(model.named_modules())
    sizes = {name: modules[name].in_features for name in targeted}
    bad = {name: size for name, size in sizes.items() if size % block_size}
    if bad:
        name, size = next(iter(bad.items()))
        common = sorted({b for b in range(2, 129) if all(s % b == 0 for s in sizes.values())})
        raise TargetError(
            f"OFT's block_size {block_size} does not divide the input size of {len(bad)} "
            f"targeted layers ({name} has {size}). Block sizes that divide them all: "
            f"{', '.join(map(str, common)) or 'none up to 128'}."
        )


def peft_config(model: nn.Module, config: OFTConfig) -> peft.OFTConfig:
    """PEFT's OFTConfig for a model: Linear targets whose input sizes the blocks divide."""
    targeted, _ = peft_tuner.targets(model, config.target_modules)
    peft_tuner.refuse_conv1d(model, targeted, "OFT", "lora, ia3 or vera")
    check_block_size(model, targeted, config.block_size)
    options = {
        "r": 0,  # PEFT takes either the number of blocks or their size; peftkit sets the size
        "oft_block_size": config.block_size,
        "use_cayley_neumann": config.use_cayley_neumann,
        "num_cayley_neumann_terms": config.num_cayley_neumann_terms,
        "coft": config.coft,
        "eps": config.eps,
        "block_share": config.block_share,
        "module_dropout": config.module_dropout,
        "target_modules": peft_tuner.peft_spec(model, config.target_modules),
        **peft_tuner.common_options(model),
    }
    return peft_tuner.build_peft_config(peft.OFTConfig, options, config)


# The adapter_config.json keys OFTConfig's own fields read.
NAMED_KEYS = frozenset(
    {"r", "oft_block_size", "use_cayley_neumann", "num_cayley_neumann_terms", "coft", "eps",
     "block_share", "module_dropout", "target_modules"}
)  # fmt: skip


def config_from_adapter(saved: dict[str, Any]) -> OFTConfig:
    """Our config from a PEFT OFT adapter_config.json (written by peftkit or by PEFT)."""
    if saved.get("r") and not saved.get("oft_block_size"):
        raise AdapterError(
            "This OFT adapter gives its number of blocks (r) instead of their size; peftkit "
            "reads adapters with oft_block_size set (PEFT's default way)."
        )
    return OFTConfig(
        block_size=saved["oft_block_size"],
        use_cayley_neumann=saved.get("use_cayley_neumann", True),
        num_cayley_neumann_terms=saved.get("num_cayley_neumann_terms", 5),
        coft=saved.get("coft", False),
        eps=saved.get("eps", 6e-5),
        block_share=saved.get("block_share", False),
        module_dropout=saved.get("module_dropout", 0.0),
        target_modules=saved.get("target_modules"),
        peft_fields=peft_tuner.saved_peft_fields(saved, peft.OFTConfig, NAMED_KEYS),
    )


OFT = peft_tuner.peft_method(
    "oft",
    OFTConfig,
    "OFT",
    peft_config,
    config_from_adapter,
    "block-diagonal orthogonal rotation of chosen linear layers (HF PEFT)",
)
