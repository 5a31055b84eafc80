"""AdaLoRA (Zhang et al., 2023) through HF PEFT, with the rank schedule driven by peftkit's hooks.

The update is P diag(lambda) Q per adapted matrix; a global rank budget falls on a cubic schedule
from `init_rank` per matrix to `target_rank` per matrix, pruning the least important singular
values. PEFT leaves calling `update_and_allocate(step)` to the user after every optimizer step;
here `after_optimizer_step` calls it, and `begin_training` sets PEFT's `total_step`, so an ordinary
peftkit run reallocates with no call by the user.

The orthogonality regulariser ||P^T P - I||_F + ||Q Q^T - I||_F (averaged over matrices) is added
to the loss by peftkit explicitly, through `extra_loss`. PEFT's own AdaLoraModel.forward would also
add it to `outputs.loss` whenever labels are given; peftkit sets PEFT's live weight to zero so the
term is counted exactly once, and writes the configured weight into the saved adapter config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import peft
import torch
from torch import nn

from peftkit.errors import ConfigError
from peftkit.method import Method, TrainingHooks
from peftkit.methods import lora
from peftkit.methods.peft_tuners.base import check_saved_fields

# Before training starts the step budget is unknown, but PEFT refuses a config without one.
_PLACEHOLDER_STEPS = 1_000_000
_PATTERN = "_peftkit_adalora_pattern"  # the live rank pattern while training runs
_ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # PEFT RankAllocator's statistics


@dataclass(frozen=True)
class AdaLoraConfig:
    """AdaLoRA: SVD-form low-rank updates whose ranks are reallocated during training."""

    init_rank: int = field(default=12, metadata={"help": "rank of every matrix at the start"})
    target_rank: int = field(
        default=8, metadata={"help": "average rank per matrix after the budget has fallen"}
    )
    alpha: float = field(default=32.0, metadata={"help": "scale numerator, as in LoRA"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input path"})
    target_modules: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "module names (suffix match), a regex (full match), or 'all-linear'; "
            "default: the architecture's query and value projections"
        },
    )
    warmup_steps: int = field(
        default=0, metadata={"help": "tinit: steps at the full initial budget before pruning"}
    )
    final_steps: int = field(
        default=0, metadata={"help": "tfinal: last steps at the target budget, ranks fixed"}
    )
    allocate_every: int = field(
        default=1, metadata={"help": "deltaT: optimizer steps between two reallocations"}
    )
    beta1: float = field(default=0.85, metadata={"help": "EMA factor of the sensitivity"})
    beta2: float = field(default=0.85, metadata={"help": "EMA factor of the uncertainty"})
    orth_reg_weight: float = field(
        default=0.5, metadata={"help": "weight of the orthogonality regulariser on P and Q"}
    )
    total_steps: int | None = field(
        default=None,
        metadata={"help": "schedule length; default: the training run's step budget"},
    )
    rank_pattern: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "kept ranks per matrix: written by training, read when loading"},
    )

    def __post_init__(self) -> None:
        if not 1 <= self.target_rank <= self.init_rank:
            raise ConfigError(
                f"AdaLoRA needs 1 <= target_rank <= init_rank, got target_rank="
                f"{self.target_rank}, init_rank={self.init_rank}."
            )
        if self.warmup_steps < 0 or self.final_steps < 0 or self.allocate_every < 1:
            raise ConfigError("warmup_steps and final_steps must be >= 0, allocate_every >= 1.")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}.")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ConfigError(
                f"beta1 and beta2 must lie in (0, 1), got {self.beta1}, {self.beta2}."
            )
        if self.total_steps is not None:
            check_schedule(self, self.total_steps)


def check_schedule(config: AdaLoraConfig, total_steps: int) -> None:
    """Refuse a schedule that leaves no steps for the budget to fall."""
    if config.warmup_steps >= total_steps - config.final_steps:
        raise ConfigError(
            f"AdaLoRA's schedule has no pruning phase: warmup_steps ({config.warmup_steps}) "
            f"must be below total_steps ({total_steps}) minus final_steps ({config.final_steps}). "
            "Train longer or shorten the warm-up and final phases."
        )


def peft_config(model: nn.Module, config: AdaLoraConfig) -> peft.AdaLoraConfig:
    """PEFT's AdaLoraConfig, with targets, task type and head chosen as for LoRA."""
    base = lora.peft_config(
        model,
        lora.LoraConfig(
            rank=config.init_rank,
            alpha=config.alpha,
            dropout=config.dropout,
            target_modules=config.target_modules,
        ),
    )
    return peft.AdaLoraConfig(
        init_r=config.init_rank,
        target_r=config.target_rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=base.target_modules,
        task_type=base.task_type,
        modules_to_save=base.modules_to_save,
        fan_in_fan_out=base.fan_in_fan_out,
        tinit=config.warmup_steps,
        tfinal=config.final_steps,
        deltaT=config.allocate_every,
        beta1=config.beta1,
        beta2=config.beta2,
        # Zero: PEFT's forward would add the regulariser to outputs.loss; peftkit adds it itself.
        orth_reg_weight=0.0,
        total_step=config.total_steps or _PLACEHOLDER_STEPS,
        rank_pattern=config.rank_pattern,
    )


def live_config(model: peft.PeftModel) -> peft.AdaLoraConfig:
    """The PEFT config object the rank allocator reads (changes to it take effect)."""
    return model.peft_config[model.active_adapter]


def apply(model: nn.Module, config: AdaLoraConfig) -> peft.PeftModel:
    """Wrap the model in PEFT's AdaLoRA (a saved rank pattern shrinks the matrices on load)."""
    return peft.get_peft_model(model, peft_config(model, config))


def set_total_steps(model: peft.PeftModel, config: AdaLoraConfig, total_steps: int) -> None:
    """Fix the schedule's length once the run's step budget is known (config's own value wins)."""
    steps = config.total_steps or total_steps
    check_schedule(config, steps)
    live_config(model).total_step = steps


def update_and_allocate(model: peft.PeftModel, step: int) -> None:
    """After an optimizer step, before gradients are zeroed: score, prune, reallocate ranks."""
    live = live_config(model)
    live.rank_pattern = getattr(model, _PATTERN, None) or live.rank_pattern
    model.base_model.update_and_allocate(step)
    object.__setattr__(model, _PATTERN, live.rank_pattern)
    if step + 1 < live.total_step:
        # Mid-run saves (checkpoints) keep full-size matrices, pruned values at zero, so a resumed
        # run has the shapes of the optimizer state it restores (PEFT would cut them to the
        # pattern on save and shrink the modules on load). The final save cuts, in PEFT's format.
        live.rank_pattern = None


def training_state(model: peft.PeftModel) -> dict[str, Any]:
    """What a checkpoint needs beyond the adapter: the rank pattern and the importance EMAs."""
    allocator = model.base_model.rankallocator
    return {
        "rank_pattern": getattr(model, _PATTERN, None),
        **{key: dict(getattr(allocator, key)) for key in _ALLOCATOR_STATE},
    }


def load_training_state(model: peft.PeftModel, saved: dict[str, Any]) -> None:
    """Restore training_state() on resume (after begin_training, before the next step)."""
    object.__setattr__(model, _PATTERN, saved["rank_pattern"])
    allocator = model.base_model.rankallocator
    for key in _ALLOCATOR_STATE:
        setattr(allocator, key, {name: value.clone() for name, value in saved[key].items()})


def orthogonality_loss(model: nn.Module) -> torch.Tensor:
    """Mean over P and Q matrices of ||P^T P - I||_F (Q: ||Q Q^T - I||_F), as in the paper."""
    terms = []
    for name, parameter in model.named_parameters():
        if ".lora_A." in name:
            gram = parameter @ parameter.T  # Q is r x in: its rows should be orthonormal
        elif ".lora_B." in name:
            gram = parameter.T @ parameter  # P is out x r: its columns should be orthonormal
        else:
            continue
        identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        terms.append(torch.linalg.matrix_norm(gram - identity))
    return torch.stack(terms).mean() if terms else torch.zeros(())


def current_ranks(model: peft.PeftModel) -> dict[str, int]:
    """Each adapted matrix's current rank: kept entries of the rank pattern, else its full rank."""
    pattern = getattr(model, _PATTERN, None) or live_config(model).rank_pattern
    if pattern:
        return {
            key.replace(".default", ""): int(torch.as_tensor(kept).sum())
            for key, kept in pattern.items()
        }
    return {
        name.removesuffix(".default"): parameter.shape[0]
        for name, parameter in model.base_model.model.named_parameters()
        if name.endswith(".lora_E.default")
    }


def hooks(model: peft.PeftModel, config: AdaLoraConfig) -> TrainingHooks:
    """Set the schedule at the start, reallocate after every step, add the regulariser."""

    def extra_loss(tuned: nn.Module) -> torch.Tensor:
        return config.orth_reg_weight * orthogonality_loss(tuned)

    return TrainingHooks(
        begin_training=lambda tuned, total: set_total_steps(tuned, config, total),
        after_optimizer_step=update_and_allocate,
        extra_loss=extra_loss if config.orth_reg_weight > 0 else None,
        state=training_state,
        load_state=load_training_state,
    )


def state_dict(model: peft.PeftModel) -> dict[str, Any]:
    """PEFT's tensors, already cut to the kept ranks when a rank pattern exists."""
    return peft.get_peft_model_state_dict(model)


def adapter_config(model: peft.PeftModel, config: AdaLoraConfig) -> dict[str, Any]:
    """PEFT's adapter_config.json: final rank pattern, real schedule, the configured regulariser."""
    saved = lora.adapter_config(model, config)
    saved["orth_reg_weight"] = config.orth_reg_weight
    pattern = saved.get("rank_pattern") or None
    if pattern:
        # PEFT's loader expects names without the adapter name; tensors from torch become lists.
        saved["rank_pattern"] = {
            key.replace(".default", ""): [bool(v) for v in torch.as_tensor(value).view(-1).tolist()]
            for key, value in pattern.items()
        }
    return saved


def config_from_adapter(saved: dict[str, Any]) -> AdaLoraConfig:
    """Our config from a PEFT AdaLoRA adapter_config.json (written by peftkit or by PEFT)."""
    return AdaLoraConfig(
        init_rank=saved["init_r"],
        target_rank=saved["target_r"],
        alpha=saved["lora_alpha"],
        dropout=saved.get("lora_dropout", 0.0),
        target_modules=saved.get("target_modules"),
        warmup_steps=saved.get("tinit", 0),
        final_steps=saved.get("tfinal", 0),
        allocate_every=saved.get("deltaT", 1),
        beta1=saved.get("beta1", 0.85),
        beta2=saved.get("beta2", 0.85),
        orth_reg_weight=saved.get("orth_reg_weight", 0.5),
        total_steps=saved.get("total_step"),
        rank_pattern=saved.get("rank_pattern") or None,
    )


def check_loaded(model: peft.PeftModel, saved: dict[str, Any]) -> None:
    """Refuse, by name, a field of a saved AdaLoRA adapter_config.json the loaded model does not
    carry (AdaLoraConfig has no peft_fields: PEFT's alpha_pattern, exclude_modules, bias and the
    rest are refused rather than dropped). The rank pattern and the regulariser's weight are
    read by this module itself."""
    check_saved_fields(model, saved, own=frozenset({"rank_pattern", "orth_reg_weight"}))


ADALORA = Method(
    name="adalora",
    config_cls=AdaLoraConfig,
    apply=apply,
    state_dict=state_dict,
    load_state_dict=lora.load_state_dict,
    hooks=hooks,
    merge=lora.merge,
    remove=lora.remove,
    switch_off=lora.switch_off,
    peft_type="ADALORA",
    adapter_config=adapter_config,
    config_from_adapter=config_from_adapter,
    description="SVD-form LoRA whose rank budget falls on a schedule during training (HF PEFT)",
    check_loaded=check_loaded,
    shardable="its rank allocation reads every layer's whole adapter weights and gradients "
    "after each backward pass and masks them in place (PEFT's update_and_allocate)",
)
