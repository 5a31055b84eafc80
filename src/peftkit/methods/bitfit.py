"""BitFit (Ben Zaken et al., 2021): train only the bias terms (and the new task head).

Biases are grouped the way the reference code unfreezes them by name: the query/key/value
projections, the attention output projection, the feed-forward projections, and layer norms.
Llama-style models have no biases on most linear layers; BitFit then refuses to run until the user
chooses what the BitFit literature does: train only the biases that exist ("skip"), or add
zero-initialised biases to the selected projections ("add"), which leaves the model's output
unchanged at the start."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from peftkit.errors import ConfigError, TargetError
from peftkit.method import Method
from peftkit.targeting import ROLES, is_linear, model_type, module_role, task_head_modules

GROUPS = ("all", *(role for role in ROLES if role != "other"))  # a bias group is a module role
MISSING_CHOICES = ("error", "skip", "add")

# transformers configs flags that make from_pretrained build (and so load) these biases.
_CONFIG_BIAS_FLAGS = {"attention_bias": ("query_key_value", "attention_output"),
                      "mlp_bias": ("feed_forward",)}  # fmt: skip
_STATE = "_peftkit_bitfit"


@dataclass(frozen=True)
class BitFitConfig:
    """Train only bias terms, chosen by group, plus the new task head."""

    bias_groups: list[str] = field(
        default_factory=lambda: ["all"],
        metadata={
            "help": "which biases train: 'all' (every bias in the model), or any of "
            "'query_key_value', 'attention_output', 'feed_forward', 'layer_norm'"
        },
    )
    train_head: bool = field(
        default=True, metadata={"help": "also train the new task head (a classifier)"}
    )
    missing_biases: str = field(
        default="error",
        metadata={
            "help": "selected layers that have no bias (Llama, Qwen2, T5): 'error' stops and "
            "says which; 'skip' trains only the biases that exist; 'add' adds zero-initialised "
            "biases to those linear projections (norms without bias stay without)"
        },
    )

    def __post_init__(self) -> None:
        unknown = [g for g in self.bias_groups if g not in GROUPS]
        if unknown or not self.bias_groups:
            raise ConfigError(
                f"bias_groups {list(self.bias_groups)!r} must be a non-empty list of: "
                f"{', '.join(GROUPS)}."
            )
        if self.missing_biases not in MISSING_CHOICES:
            raise ConfigError(
                f"missing_biases must be one of {', '.join(MISSING_CHOICES)}, "
                f"got {self.missing_biases!r}."
            )


def _selected(group: str, config: BitFitConfig) -> bool:
    """Whether a group's biases train under this config ('other' only under 'all')."""
    return "all" in config.bias_groups or group in config.bias_groups


def _bias_owners(model: nn.Module, config: BitFitConfig) -> tuple[list[str], list[str]]:
    """(modules in the selected groups with a bias, those without one) by full module name."""
    with_bias, without_bias = [], []
    for name, module in model.named_modules():
        group = module_role(name, module)
        if not name or not _selected(group, config):
            continue
        bias = module._parameters.get("bias") if "bias" in module._parameters else None
        if isinstance(bias, nn.Parameter):
            with_bias.append(name)
        elif group != "other" and (is_linear(module) or hasattr(module, "weight")):
            without_bias.append(name)
    return with_bias, without_bias


def _add_zero_bias(module: nn.Module) -> None:
    """Give a linear layer a zero bias, which its forward (F.linear) then adds."""
    weight = module.weight
    out_features = weight.shape[1] if type(module).__name__ == "Conv1D" else module.out_features
    # A quantised layer's weight holds packed integers: its bias takes the float compute dtype.
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    dtype = getattr(module, "compute_dtype", None) or dtype
    module.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=weight.device))


def _handle_missing(model: nn.Module, config: BitFitConfig, missing: list[str]) -> list[str]:
    """Apply the missing_biases choice; returns the modules that were given a new bias."""
    if not missing:
        return []
    modules = dict(model.named_modules())
    kinds = sorted({name.rsplit(".", 1)[-1] for name in missing})
    kind = model_type(model) or type(model).__name__
    if config.missing_biases == "error":
        raise TargetError(
            f"BitFit: {len(missing)} selected layers of this {kind} model have no bias "
            f"(layers ending in {', '.join(kinds)}), so BitFit would train little or nothing "
            "there. Choose missing_biases='skip' to train only the biases that exist, or "
            "missing_biases='add' to add zero-initialised biases to those linear layers."
        )
    if config.missing_biases == "add":
        linear = [name for name in missing if is_linear(modules[name])]
        for name in linear:
            _add_zero_bias(modules[name])
        return linear
    return []


def apply(model: nn.Module, config: BitFitConfig) -> nn.Module:
    """Freeze everything except the selected biases (and the task head); raise if that is none."""
    original = {n: p.requires_grad for n, p in model.named_parameters()}
    with_bias, missing = _bias_owners(model, config)
    added = _handle_missing(model, config, missing)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in with_bias + added:
        modules[name].bias.requires_grad_(True)
    for name in task_head_modules(model):  # the whole head, its bias included, or none of it
        modules[name].requires_grad_(config.train_head)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trained == 0:
        raise TargetError(
            f"BitFit with bias_groups={list(config.bias_groups)} selects no parameter of this "
            f"{model_type(model) or type(model).__name__} model (it has no such biases and no "
            "new task head). Use missing_biases='add', or choose other bias_groups."
        )
    if config.missing_biases == "skip" and missing:
        warnings.warn(
            f"BitFit: {len(missing)} selected layers have no bias and are left frozen; training "
            f"{len(with_bias)} existing bias tensors ({trained:,} parameters with the head).",
            stacklevel=2,
        )
    object.__setattr__(model, _STATE, {"original": original, "added": added})
    return model


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors only: the selected biases and the head, under their own names."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved biases (and head) into the model."""
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)


def _declare_added_biases(model: nn.Module, added: list[str]) -> None:
    """Make the transformers config build the added biases, so save_pretrained round-trips."""
    modules = dict(model.named_modules())
    groups = {module_role(name, modules[name]) for name in added}
    covered: set[str] = set()
    for flag, flag_groups in _CONFIG_BIAS_FLAGS.items():
        if groups & set(flag_groups) and hasattr(model.config, flag):
            setattr(model.config, flag, True)
            covered |= set(flag_groups)
            # The flag gives every layer of these groups a bias: fill the unselected with zeros.
            for name, module in modules.items():
                if module_role(name, module) in flag_groups and module.bias is None:
                    _add_zero_bias(module)
    if groups - covered:
        warnings.warn(
            f"BitFit: this {model_type(model)} model's config cannot declare the biases added to "
            f"its {', '.join(sorted(groups - covered))} layers, so save_pretrained followed by "
            "from_pretrained would drop them. Keep the merged model in memory, or save the "
            "BitFit adapter with peftkit.save and load it onto the base.",
            stacklevel=3,
        )


def merge(model: nn.Module) -> nn.Module:
    """BitFit trains the model's own biases: the model is already plain. Added biases are
    declared in its config where transformers can express them."""
    added = getattr(model, _STATE, {}).get("added", [])
    if added:
        _declare_added_biases(model, added)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo apply: drop added biases, restore requires_grad."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    modules = dict(model.named_modules())
    for name in state["added"]:
        modules[name].bias = None
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(state["original"].get(name, True))
    return model


BITFIT = Method(
    name="bitfit",
    config_cls=BitFitConfig,
    apply=apply,
    state_dict=state_dict,
    load_state_dict=load_state_dict,
    merge=merge,
    remove=remove,
    description="train only bias terms (and the new task head)",
)
