"""How a LoRA-family adapter starts (`init`), for lora, rslora and dora alike.

- kaiming: the LoRA reference code's start (A Kaiming-uniform, B zero); PEFT's default.
- gaussian: A ~ N(0, 1/r), B zero.
- pissa (Meng et al., 2024): A, B from the top-r singular triplets of W; the base keeps the
  residual W - s B A, so the model's output is unchanged at step 0. Full SVD (PEFT's "pissa").
- olora (Büyükakyüz, 2024): B, A from the QR decomposition of W (the first r columns of Q, rows
  of R); the base keeps W - s B A, output unchanged.
- loftq (Li et al., 2023): the base becomes its NF4-quantised values, the adapter the rank-r fit
  of what quantisation lost (lora_loftq.py, run by peftkit).
- eva (Paischer et al., 2024): A from the top right-singular vectors of each layer's inputs over
  training batches (the `prepare` hook's data pass), B zero; ranks stay r (PEFT's rho = 1).

pissa, olora and loftq change the base weights. `apply` records the initial factors (and, for
loftq, the original weights), so `remove` gives the base back, and convert.py can rewrite a
trained pissa/olora adapter for the original base."""

from __future__ import annotations

from typing import Any

import peft
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from peftkit.errors import AdapterError, ConfigError
from peftkit.method import MethodOption, TrainingHooks
from peftkit.methods.lora.loftq import loftq_factors
from peftkit.targeting import resolve_targets

INITS = ("kaiming", "gaussian", "pissa", "olora", "loftq", "eva")
# Inits that rewrite the base weights: an adapter trained from them belongs to that rewritten base.
BASE_CHANGING = ("pissa", "olora", "loftq")
# peftkit's name -> PEFT's init_lora_weights. loftq starts as PEFT's default and is then set by
# peftkit (lora_loftq.py says why); the saved config records "loftq" as PEFT spells it.
_PEFT_INIT: dict[str, Any] = {
    "kaiming": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora",
    "loftq": True, "eva": "eva",
}  # fmt: skip
ADAPTER = "default"  # the adapter name peftkit's single-adapter models use
_FACTORS = "_peftkit_initial_factors"  # module name -> (A0, B0, scale, fan_in_fan_out)
_ORIGINALS = "_peftkit_original_weights"  # loftq: module name -> the full-precision weight


def changes_base(init_lora_weights: Any) -> bool:
    """Whether a saved `init_lora_weights` (any form PEFT writes) rewrote the base weights."""
    # PEFT 0.21 (tuners/lora/layer.py): "pissa" and "pissa_niter_<n>", "corda" (prefix, as PEFT
    # matches it), "olora", "loftq" and "lora_ga" all subtract their initial factors from the
    # base weight; True, False, "gaussian", "eva", "orthogonal" and "mica" leave it alone.
    if not isinstance(init_lora_weights, str):
        return False
    init = init_lora_weights.lower()
    return init.startswith(("pissa", "corda")) or init in ("olora", "loftq", "lora_ga")


def check_init_name(init: str) -> None:
    """Refuse an init peftkit does not know, naming the ones it does."""
    if init not in INITS:
        raise ConfigError(f"Unknown LoRA init '{init}'; use one of: {', '.join(INITS)}.")


def peft_options(config: Any) -> dict[str, Any]:
    """The peft.LoraConfig arguments that set the init."""
    options: dict[str, Any] = {"init_lora_weights": _PEFT_INIT[config.init]}
    if config.init == "eva":
        # rho = 1 keeps every layer at rank r: the saved adapter has one rank, as the config says.
        options["eva_config"] = peft.EvaConfig(rho=1.0)
    return options


def init_from_saved(saved: dict[str, Any]) -> dict[str, Any]:
    """The init options recorded in a PEFT LoRA adapter_config.json."""
    value = saved.get("init_lora_weights", True)
    if value is True or value is False:  # False: PEFT's "no init", a debugging aid; the same files
        return {"init": "kaiming"}
    if value == "loftq":
        iterations = (saved.get("loftq_config") or {}).get("loftq_iter", 1)
        return {"init": "loftq", "loftq_iterations": iterations}
    if value not in INITS:
        raise AdapterError(
            f"The adapter was initialised with PEFT's '{value}', which peftkit cannot rebuild; "
            f"peftkit reads adapters initialised with: {', '.join(INITS)}."
        )
    return {"init": value}


def check_init_fits(model: nn.Module, config: Any) -> None:
    """Refuse, before anything changes, an init this model's adapted layers cannot take."""
    if config.init == "kaiming":
        return
    modules = dict(model.named_modules())
    targets = [modules[name] for name in resolve_targets(model, config.target_modules)]
    if config.init == "olora" and any(type(m).__name__ == "Conv1D" for m in targets):
        raise ConfigError(
            "init 'olora' cannot adapt GPT-2's Conv1D layers: PEFT 0.21's OLoRA ignores their "
            "transposed layout and builds factors of the wrong shape. Use init 'pissa' there."
        )
    if config.init == "loftq":
        frozen = [m.weight.dtype for m in targets if not m.weight.dtype.is_floating_point]
        if frozen:
            raise ConfigError(
                f"init 'loftq' quantises the full-precision weights itself, but this base's "
                f"adapted layers hold {frozen[0]} weights (already quantised). Load the "
                "full-precision base model."
            )
    if config.init == "eva" and getattr(model.config, "is_encoder_decoder", False):
        raise ConfigError(
            "init 'eva' reads each layer's inputs through one token mask, which an "
            "encoder-decoder model does not share between its stacks; use it on encoder or "
            "decoder models."
        )


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Module name (in the base model) -> PEFT LoRA layer holding peftkit's adapter."""
    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A
    }


def _weight_out_in(layer: LoraLayer) -> torch.Tensor:
    """The base weight as (out, in), whatever the layer's storage layout."""
    weight = layer.get_base_layer().weight
    return weight.T if layer.fan_in_fan_out else weight


@torch.no_grad()
def initialise(model: nn.Module, config: Any) -> None:
    """After PEFT built the layers: run LoftQ, and note what a base-changing init changed."""
    if config.init not in BASE_CHANGING:
        return
    layers = lora_layers(model)
    if any(layer.get_base_layer().weight.is_meta for layer in layers.values()):
        return  # the memory estimator's shapes-only model: nothing to compute
    if config.init == "loftq":
        originals = {}
        for name, layer in layers.items():
            base = layer.get_base_layer()
            originals[name] = base.weight.data  # kept, so remove() restores it exactly
            q, a, b = loftq_factors(
                _weight_out_in(layer), layer.r[ADAPTER], layer.scaling[ADAPTER],
                config.loftq_iterations,
            )  # fmt: skip
            base.weight.data = (q.T if layer.fan_in_fan_out else q).to(base.weight.dtype)
            layer.lora_A[ADAPTER].weight.data = a.to(layer.lora_A[ADAPTER].weight.dtype)
            layer.lora_B[ADAPTER].weight.data = b.to(layer.lora_B[ADAPTER].weight.dtype)
        object.__setattr__(model, _ORIGINALS, originals)
        peft_config = model.peft_config[ADAPTER]
        peft_config.init_lora_weights = "loftq"  # what the saved adapter_config.json says
        peft_config.loftq_config = {"loftq_bits": 4, "loftq_iter": config.loftq_iterations}
    factors = {
        name: (
            layer.lora_A[ADAPTER].weight.detach().clone(),
            layer.lora_B[ADAPTER].weight.detach().clone(),
            layer.scaling[ADAPTER],
            layer.fan_in_fan_out,
        )
        for name, layer in layers.items()
    }
    object.__setattr__(model, _FACTORS, factors)


def initial_factors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]]:
    """Module name -> (A0, B0, scale, fan_in_fan_out) of a base-changing init ({} otherwise)."""
    return getattr(model, _FACTORS, {})


@torch.no_grad()
def restore_base(model: nn.Module, plain: nn.Module) -> None:
    """Give the unloaded base model its weights from before apply (`model` is the adapted one)."""
    originals = getattr(model, _ORIGINALS, None)
    modules = dict(plain.named_modules())
    for name, (a0, b0, scale, fan_in_fan_out) in initial_factors(model).items():
        weight = modules[name].weight
        if originals is not None:  # loftq: the quantised base cannot be undone, only replaced
            weight.data = originals[name]
            continue
        delta = scale * b0 @ a0  # pissa/olora: W = residual + s B0 A0
        weight += (delta.T if fan_in_fan_out else delta).to(weight.dtype)


def _token_positions(model_input: dict[str, Any], peft_config: Any) -> torch.Tensor:
    """The (row, position) pairs whose layer inputs EVA reads: real tokens, and where labels are
    per token, only those the loss reads (classification labels are per row)."""
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    labels = model_input.get("labels")
    if labels is not None and labels.shape == mask.shape:
        mask = mask & (labels != -100)
    return mask.nonzero()


def eva_prepare(model: nn.Module, batches: Any) -> None:
    """EVA's data pass (the prepare hook): A from the principal directions of layer inputs."""
    training = model.training
    model.eval()  # the directions of the inputs themselves, without dropout
    try:
        peft.initialize_lora_eva_weights(
            model, dataloader=batches, prepare_model_inputs_fn=_token_positions,
            # Every process sees all the batches (the pipeline's prepare contract): no gather.
            gather_distributed_inputs=False, show_progress_bar=False,
        )  # fmt: skip
    finally:
        model.train(training)


def _hooks(model: nn.Module, config: Any) -> TrainingHooks:
    """EVA's data pass before training; the other inits need none."""
    return TrainingHooks(prepare=eva_prepare if config.init == "eva" else None)


INIT = MethodOption(
    name="init",
    description="how A and B start: " + " | ".join(INITS) + " (and loftq_iterations)",
    check=check_init_fits,
    after_apply=initialise,
    after_remove=restore_base,
    hooks=_hooks,
)
