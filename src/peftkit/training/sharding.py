"""`training.sharding: fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) under torchrun. Each
transformer layer (decoder layer, encoder block) is one sharded unit, the whole model the root
last; a process keeps 1/N of every parameter, its gradient and its optimizer state, gathers one
unit's parameters whole for its forward and backward passes and frees them after
(reshard_after_forward). On a GPU the gathered parameters compute in bf16 with fp32 gradient
reduction when the recipe trains in bf16 (MixedPrecisionPolicy); gloo on CPU, NCCL on GPU.

The trained tensors are gathered whole after training (every process joins) and the main
process rebuilds the model from them to evaluate and save the adapter in PEFT's files. Checkpoints
and --resume: sharded_checkpoints.py (torch.distributed.checkpoint)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import peftkit.api as api
from peftkit.errors import ConfigError
from peftkit.models import load_model
from peftkit.training.distributed import distributed, sharding_backend

if TYPE_CHECKING:
    from peftkit.recipe import Recipe


def sharded(recipe: Recipe) -> bool:
    """Whether this run shards the model: training.sharding is fsdp and there are processes."""
    return recipe.training.sharding == "fsdp" and distributed()


def refuse_unsupported(recipe: Recipe, resume: Any, own_trainer: bool = False) -> None:
    """What training.sharding: fsdp cannot do: share the job with accelerate's own FSDP or
    DeepSpeed, or write and resume checkpoints under a task type's own trainer (TRL's: its
    checkpoints would save the main process's shard of the optimizer alone)."""
    if recipe.training.sharding == "none":
        return
    backend = sharding_backend()
    if backend is not None:
        raise ConfigError(
            f"training.sharding: fsdp shards the model itself; launch it with torchrun or "
            f"accelerate launch without {backend} (or set training.sharding: none and let "
            f"{backend} shard)."
        )
    if own_trainer and (recipe.training.save_steps > 0 or resume):
        raise ConfigError(
            f"Checkpoints and --resume are not supported with training.sharding: fsdp for task "
            f"type {recipe.task.type!r} (it trains with its own trainer, whose checkpoints "
            "would hold one process's shard of the optimizer): set training.save_steps: 0, or "
            "train with sharding: none (DDP)."
        )


def no_split(module: nn.Module) -> list[str]:
    """The layer classes a transformers model says must not be split across devices."""
    return list(getattr(module, "_no_split_modules", None) or [])


def wrapped_units(model: nn.Module) -> list[nn.Module]:
    """The transformer layers FSDP shards one by one: members of a ModuleList whose class the
    model names as not to be split (its decoder layers or encoder blocks)."""
    kinds = {kind for module in model.modules() for kind in no_split(module)}
    return [
        layer
        for stack in model.modules()
        if isinstance(stack, nn.ModuleList)
        for layer in stack
        if type(layer).__name__ in kinds
    ]


def float_storage(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every 4-bit (NF4) weight's packed bytes as `dtype` instead of uint8, unchanged
    (bitsandbytes' `quant_storage`, as its FSDP-QLoRA guide does): FSDP shards and gathers them
    like the float weights, and its mixed-precision cast to `dtype` leaves them as they are.
    The quantisation state stays on each layer. Returns the number of weights re-stored."""
    from peftkit.models.quantize import bitsandbytes

    bnb = bitsandbytes()
    count = 0
    for module in model.modules():
        weight = module._parameters.get("weight")  # its own (an adapter's wrapper only points)
        if not isinstance(weight, bnb.nn.Params4bit) or weight.dtype == dtype:
            continue
        packed = weight.data.view(torch.uint8).reshape(-1)
        if packed.numel() % dtype.itemsize:
            raise ConfigError(
                f"training.sharding: fsdp cannot store the 4-bit weight of {type(module).__name__} "
                f"({packed.numel()} bytes) as {dtype}: its size is not a multiple of "
                f"{dtype.itemsize} bytes. Train this base with sharding: none."
            )
        module.weight = bnb.nn.Params4bit(
            packed.view(dtype).reshape(-1, 1), requires_grad=False,
            quant_state=weight.quant_state, blocksize=weight.blocksize,
            compress_statistics=weight.compress_statistics, quant_type=weight.quant_type,
            quant_storage=dtype, module=module, bnb_quantized=True,
        )  # fmt: skip
        module.quant_storage = dtype  # the layer rebuilds its weight from these after a gather
        module.quant_state = weight.quant_state
        count += 1
    return count


def refuse_8bit(model: nn.Module) -> None:
    """LLM.int8 weights (int8 data with their scales kept on the parameter) cannot be sharded:
    a gathered weight loses its scales."""
    for module in model.modules():
        if type(module._parameters.get("weight")).__name__ == "Int8Params":
            raise ConfigError(
                "training.sharding: fsdp cannot shard an int8 base (base.quantize: int8): "
                "LLM.int8 keeps each weight's scales on the weight, which a gathered shard "
                "loses. Use base.quantize: nf4 (stored in a float dtype and sharded), or "
                "sharding: none."
            )


def shard(model: nn.Module, precision: str) -> list[nn.Module]:
    """Apply FSDP2 to each transformer layer, then to the model as the root; returns the
    layers. Trainer then leaves placement and gradient reduction to FSDP (no DDP wrapper). A
    4-bit base's packed weights are first re-stored in the dtype the layers compute with
    (float_storage)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    refuse_8bit(model)
    gpu_bf16 = torch.cuda.is_available() and precision == "bf16"
    float_storage(model, torch.bfloat16 if gpu_bf16 else float_dtype_of(model))
    units = wrapped_units(model)
    if not units:
        raise ConfigError(
            f"training.sharding: fsdp found no transformer layers to shard in "
            f"{type(model).__name__} (it shards the layers its class names in "
            "_no_split_modules); train it with sharding: none."
        )
    policy = MixedPrecisionPolicy()
    if gpu_bf16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for unit in units:
        fully_shard(unit, reshard_after_forward=True, mp_policy=policy)
    fully_shard(model, reshard_after_forward=True, mp_policy=policy)
    # transformers' Trainer reads is_distributed_loading_by_transformers (its own sharded loading
    # sets it): the model owns its placement and gradient reduction, so accelerate must not wrap
    # it in DDP. On a transformers model it is a property over this attribute; a wrapper (PEFT's
    # PeftModel, peftkit's virtual-token wrapper) is given the attribute itself.
    if hasattr(type(model), "_is_distributed_loading_by_transformers"):
        model._is_distributed_loading_by_transformers = True
    else:
        model.is_distributed_loading_by_transformers = True
    return units


def float_dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point weight that is not 4-bit (its base dtype)."""
    for parameter in model.parameters():
        if parameter.is_floating_point() and type(parameter).__name__ != "Params4bit":
            return parameter.dtype
    return torch.float32


def gather_trained(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter and persistent buffer, whole, by name (a collective: every process
    calls it, in the same order); on the CPU."""
    from torch.distributed.tensor import DTensor

    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    whole = {}
    for name, tensor in model.state_dict().items():  # parameters and persistent buffers
        if name in frozen:
            continue
        value = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        whole[name] = value.detach().cpu()
    return whole


def rebuilt_model(model: nn.Module, recipe: Recipe, config: Any, main: bool) -> Any:
    """The trained model, whole, on the main process (None elsewhere): the base loaded again,
    the method applied, the gathered trained tensors loaded into it. The frozen weights are the
    base's own, untouched by training."""
    trained = gather_trained(model)
    if not main:
        return None
    base, _ = load_model(
        recipe.model, recipe.task.type, num_labels=model.config.num_labels,
        seed=recipe.training.seed, dtype=recipe.base.dtype, quantize=recipe.base.quantize,
    )  # fmt: skip
    rebuilt = api.apply(base, config)
    trainable = {name for name, p in rebuilt.named_parameters() if p.requires_grad}
    missing = (set(trained) - set(rebuilt.state_dict())) | (trainable - set(trained))
    if missing:
        raise ConfigError(
            "The sharded model's trained tensors do not fit the rebuilt model (the method "
            f"built other tensors when applied again): {sorted(missing)[:5]}"
        )
    rebuilt.load_state_dict(trained, strict=False)
    return rebuilt
