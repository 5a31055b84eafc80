"""LoRA+ (Hayou et al., 2024, arXiv:2402.12354): train B with a learning rate `ratio` times A's.

The paper shows that with one learning rate for both factors, feature learning is inefficient at
large width; setting lr_B = ratio * lr_A (ratio 16 suggested) converged up to 2x faster and
gained 1-2% accuracy. Which parameter gets which rate is the reference implementation's rule
(github.com/nikhil-ghosh-berkeley/loraplus), as PEFT's `create_loraplus_optimizer` has it:

- the A and B factors of a LoRA on an embedding layer: a fixed rate of their own
  (`loraplus_lr_embedding`, 1e-6 as there), whatever the group's rate;
- every other B matrix and every trained 1-D tensor (DoRA's magnitude vectors, a trained head's
  bias): ratio x lr;
- the rest (A matrices, a trained head's weight): lr.

peftkit does it through the `replace_optimizer` hook: the trainer's own optimizer keeps its type
and its groups (weight decay or not; PEFT's function instead builds groups with one
`loraplus_weight_decay`), and each group is split by the rule above. Schedulers built afterwards
scale every group from its own starting rate, so the ratio holds throughout."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from peftkit.method import MethodOption, TrainingHooks

# LoRA+'s learning rate for LoRA on embedding layers: the reference's and PEFT's default.
EMBEDDING_LR = 1e-6


def is_lora_b(parameter_name: str) -> bool:
    """Whether a parameter is a LoRA B matrix (PEFT's names: lora_B, lora_embedding_B)."""
    return ".lora_B." in parameter_name or ".lora_embedding_B." in parameter_name


def loraplus_kind(model: nn.Module, name: str, parameter: torch.Tensor) -> str:
    """Which LoRA+ rate a trained parameter gets: 'embedding' (A or B of a LoRA on an embedding
    layer), 'b' (other B matrices and every 1-D tensor: ratio x lr) or 'a' (lr); the rule of
    PEFT's create_loraplus_optimizer."""
    from peft.tuners.lora.layer import Embedding

    holder = ".".join(name.split(".")[:-2])  # <layer>.lora_embedding_A.default -> <layer>
    if holder and isinstance(model.get_submodule(holder), Embedding):
        return "embedding"
    if ".lora_B." in name or parameter.ndim == 1:
        return "b"
    return "a"


def split_b_groups(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ratio: float,
    embedding_lr: float = EMBEDDING_LR,
) -> Any:
    """The optimizer with each group split by LoRA+'s rule (loraplus_kind): B matrices and 1-D
    tensors at ratio x the group's lr, embedding LoRA at `embedding_lr`, the rest as it was.

    Changed in place, before any step (the pipeline calls it once the optimizer is built), so the
    optimizer's class, its defaults and the objects holding it stay as they are."""
    if any(optimizer.state.values()):
        raise RuntimeError("LoRA+ regroups an optimizer before its first step, not after.")
    kinds = {id(p): loraplus_kind(model, name, p) for name, p in model.named_parameters()}
    groups = list(optimizer.param_groups)
    optimizer.param_groups.clear()
    for group in groups:
        options = {key: value for key, value in group.items() if key != "params"}
        rates = {"a": options["lr"], "b": options["lr"] * ratio, "embedding": embedding_lr}
        for kind, lr in rates.items():
            members = [p for p in group["params"] if kinds.get(id(p), "a") == kind]
            if members:
                optimizer.add_param_group({**options, "params": members, "lr": lr})
    return optimizer


# adapter_config.json keys for the LoRA+ ratio and embedding rate: training options PEFT has no
# field for, kept so that a run resumed from a checkpoint rebuilds the same optimizer groups.
# PEFT ignores the keys (with a warning) when it loads the adapter.
LORAPLUS_KEY = "loraplus_lr_ratio"
EMBEDDING_KEY = "loraplus_lr_embedding"


def _saved(config: Any) -> dict[str, Any]:
    """The ratio (and the embedding rate), where a ratio is set."""
    ratio = config.loraplus_lr_ratio
    if ratio is None:
        return {}
    return {LORAPLUS_KEY: ratio, EMBEDDING_KEY: config.loraplus_lr_embedding}


def _from_saved(saved: dict[str, Any]) -> dict[str, Any]:
    """The ratio a saved adapter_config.json records (None: plain LoRA's one learning rate)."""
    return {
        "loraplus_lr_ratio": saved.get(LORAPLUS_KEY),
        "loraplus_lr_embedding": saved.get(EMBEDDING_KEY, EMBEDDING_LR),
    }


def _hooks(model: nn.Module, config: Any) -> TrainingHooks:
    """LoRA+'s parameter groups once the optimizer exists, where a ratio is set."""
    ratio = config.loraplus_lr_ratio
    if ratio is None:
        return TrainingHooks()
    return TrainingHooks(
        replace_optimizer=partial(
            split_b_groups, ratio=ratio, embedding_lr=config.loraplus_lr_embedding
        )
    )


LORA_PLUS = MethodOption(
    name="loraplus",
    description="LoRA+: loraplus_lr_ratio sets B's learning rate as a multiple of A's "
    "(loraplus_lr_embedding: LoRA's on embedding layers)",
    saved=_saved,
    from_saved=_from_saved,
    hooks=_hooks,
)
