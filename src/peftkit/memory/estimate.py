"""Estimate the memory of one training step by parts: weights, gradients, AdamW state and saved
activations, for any registered method with any of its options, on any model size.

The estimate measures what `peftkit.apply` really does, on the meta device (shapes, no memory):
the model is built for its task type, the method is applied to it, and the parameters are counted
exactly (trainable, frozen, and added by the method: applied total minus base total). The
activations come from one forward pass of the applied model (activations.py). Base precision and
quantisation are inputs like the batch size, never methods. See docs/estimate.md."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from peftkit.config import to_dict
from peftkit.errors import ConfigError, TargetError
from peftkit.memory import activations, meta, task_step
from peftkit.memory.parts import GIB, MemoryEstimate, gib
from peftkit.memory.storage import (
    BASE_DTYPES,
    BASE_TORCH_DTYPES,
    NF4_BYTES,
    PRECISIONS,
    QUANTIZATIONS,
    check,
    quantized_codes_bytes,
    quantized_layer_bytes,
    quantized_weights,
    refuse_low_bit_base,
    refuse_unshardable,
)
from peftkit.models import chunked_loss as chunked
from peftkit.recipe import check_sharding
from peftkit.registry import method_for_config

__all__ = ["GIB", "NF4_BYTES", "PRECISIONS", "QUANTIZATIONS", "MemoryEstimate", "Measurement",
           "account", "estimate", "gib", "measure"]  # fmt: skip


def describe(config: Any) -> str:
    """A method config as its name plus the options that differ from the defaults."""

    def default(f: dataclasses.Field) -> Any:
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    changed = [
        f"{f.name}={getattr(config, f.name)}"
        for f in dataclasses.fields(config)
        if getattr(config, f.name) != default(f)
    ]
    name = method_for_config(config).name
    return f"{name} ({', '.join(changed)})" if changed else name


def _check(attention: str, batch: int, seq: int) -> None:
    """Refuse an attention model or step shape the estimator does not know."""
    if attention not in activations.ATTENTION:
        raise ConfigError(
            f"Unknown attention {attention!r}; use one of: {', '.join(activations.ATTENTION)}."
        )
    if batch < 1 or seq < 1:
        raise ConfigError(f"batch_size and seq_len must be at least 1: {batch}, {seq}.")


def _persistent_bytes(tensors: Any) -> int:
    """Bytes of distinct tensors (buffers: index tables and the like)."""
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class Block:
    """The parameters FSDP gathers together for one wrapped module: a transformer layer, or the
    root's own (embeddings, final norm, output layer and task head: what no layer holds)."""

    float_parameters: int  # every parameter but the quantizable weights below
    quantizable: list[Any]  # frozen linear layers a quantised base stores in 4 or 8 bits

    def gathered_bytes(self, compute_bytes: int, quantization: str | None) -> float:
        """Bytes of the block all-gathered: float parameters in the compute dtype, quantised
        weights as their packed codes (the block constants are not sharded)."""
        weights = sum(m.weight.numel() for m in self.quantizable)
        if quantization is None:
            return (self.float_parameters + weights) * compute_bytes
        codes = sum(quantized_codes_bytes(m, quantization) for m in self.quantizable)
        return self.float_parameters * compute_bytes + codes


def _blocks(tuned: Any, layers: list[Any], linear: dict[int, Any]) -> tuple[list[Block], Block]:
    """The wrapped blocks FSDP2 gathers (training/sharding.py wraps each layer, then the root)."""

    def block(parameters: list[Any]) -> Block:
        quantizable = [linear[id(p)] for p in parameters if not p.requires_grad and id(p) in linear]
        kept = sum(p.numel() for p in parameters if p.requires_grad or id(p) not in linear)
        return Block(kept, quantizable)

    in_layers: set[int] = set()
    found = []
    for layer in layers:
        parameters = list(layer.parameters())
        in_layers.update(id(p) for p in parameters)
        found.append(block(parameters))
    return found, block([p for p in tuned.parameters() if id(p) not in in_layers])


@dataclass
class Measurement:
    """What one meta-device pass of the applied model measured. Every setting that only changes
    how parameters are stored (precision, base dtype, quantisation) or whether activations are
    checkpointed is accounted from it without another pass (`account`)."""

    model: str
    task: str
    method: str
    label: str
    method_options: dict[str, Any]
    batch_size: int
    seq_len: int
    attention: str
    total: int
    trainable: int
    added: int
    method_buffers: int  # bytes of buffers the method added (index tables)
    quantizable: list[Any]  # the frozen linear layers a quantised base stores in 4 or 8 bits
    saved: activations.SavedTensors
    notes: list[str]
    blocks: list[Block] = dataclasses.field(default_factory=list)  # one per transformer layer
    root: Block | None = None  # the parameters outside every layer
    # A task type with its own trainer (tasks/base.py StepShape): its reference is a frozen copy
    # of the policy (the method has no switch_off), and its rollouts (GRPO's generation).
    frozen_copy: bool = False
    generation: task_step.Generation | None = None


def pass_dtype(dtype: str, base_dtype: str | None) -> torch.dtype:
    """The dtype activations flow in: a half-precision base computes in its own dtype."""
    if base_dtype in ("bf16", "fp16"):
        return BASE_TORCH_DTYPES[base_dtype]
    return PRECISIONS[dtype].activation_dtype


def measure(
    model: Any,
    method: Any,
    batch_size: int,
    seq_len: int,
    activation_dtype: torch.dtype,
    task: str | None = None,
    attention: str = "auto",
    chunked_loss: bool = True,
    task_options: Any = None,
) -> Measurement:
    """Build the model for its task on the meta device, apply the method as peftkit.apply does,
    count its parameters and record one training-mode pass (module docstring). chunked_loss: a
    causal LM's loss goes through its head a chunk of tokens at a time where training's would
    (one process, a plain linear head, logits left alone: models/chunked_loss.py); False: the
    plain loss over the whole logits (as training in several processes computes it).
    task_options: the recipe's section for a task type with its own trainer (preference, kto,
    grpo; None: its defaults), which says the step's shape (task_step.py)."""
    _check(attention, batch_size, seq_len)
    attention = activations.resolve_attention(attention)
    config = meta.method_config(method)
    hf_config, name = meta.resolve_config(model)
    task = task or meta.default_task(hf_config)
    shape = meta.step_shape(task, task_options)
    base = meta.task_model(hf_config, task, activation_dtype, name)
    sequence = seq_len + (shape.generated if shape is not None else 0)
    meta.check_length(base, sequence, name)
    activations.set_attention(base, attention)
    layers = activations.transformer_layers(base)
    base_total = sum(p.numel() for p in base.parameters())
    base_buffers = _persistent_bytes(base.buffers())
    linear = quantized_weights(base)
    tuned, notes = meta.apply_on_meta(base, config)
    parameters = list(tuned.parameters())  # each shared tensor once
    total = sum(p.numel() for p in parameters)
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    quantizable = [linear[id(p)] for p in parameters if not p.requires_grad and id(p) in linear]
    blocks, root = _blocks(tuned, layers, linear)
    switch = method_for_config(config).switch_off
    generation = None
    if shape is not None:
        saved = task_step.follow_step(tuned, base, layers, batch_size, sequence, shape, switch)
        notes.extend(_step_notes(shape, switch, batch_size, seq_len))
        if shape.generated:
            vocab = base.get_output_embeddings().weight.shape[0]
            generation = task_step.follow_generation(
                tuned, len(layers), batch_size, seq_len, shape.generated, vocab
            )
    else:
        head = chunked.find_head(tuned)[0] if chunked_loss else None
        saved = activations.saved_tensors(tuned, base, layers, batch_size, seq_len, head)
        if saved.chunked:
            notes.append("the loss goes through the output layer a chunk of tokens at a time")
    if saved.sequence > sequence:
        notes.append(f"the method lengthens every sequence to {saved.sequence} positions")
    if not trainable:
        notes.append("nothing trains with these options")
    return Measurement(
        name, task, method_for_config(config).name, describe(config), to_dict(config),
        batch_size, seq_len, attention, total, trainable, total - base_total,
        _persistent_bytes(tuned.buffers()) - base_buffers, quantizable, saved, notes, blocks,
        root, shape is not None and shape.reference and switch is None, generation,
    )  # fmt: skip


def _step_notes(shape: Any, switch: Any, batch_size: int, seq_len: int) -> list[str]:
    """What the estimate of a task type's own trainer step counts, in words."""
    notes = [f"the step forwards {shape.sequences * batch_size} sequences with gradient, "
             "scored through TRL's fused LM head"]  # fmt: skip
    if shape.reference:
        notes.append(
            "the reference is the policy with its adapter switched off: its no-gradient "
            "forward, no copy"
            if switch is not None
            else "the reference is a frozen copy of "
            "the policy (the method has no switch_off): its weights and its no-gradient forward"
        )
    if shape.generated:
        notes.append(f"{batch_size} rollouts of {seq_len} prompt + {shape.generated} generated "
                     "tokens (their KV cache) before the step")  # fmt: skip
    return notes


def account(
    found: Measurement,
    dtype: str = "bf16-mixed",
    gradient_checkpointing: bool = False,
    base_dtype: str | None = None,
    quantization: str | None = None,
    gpus: int = 1,
    sharding: str = "none",
) -> MemoryEstimate:
    """The memory of a measured step under one storage regime on each of `gpus` processes:
    `dtype` (the precision: bytes of trainable weights, gradients, AdamW state), `base_dtype` (a
    frozen weight's bytes; default: the precision's own), `quantization` (the frozen linear
    weights in nf4 or int8) and `sharding` ("none": every process holds the whole model, as in
    DDP; "fsdp": weights, gradients and optimizer state divided across the processes, plus the
    blocks FSDP gathers whole; see docs/estimate.md)."""
    check(dtype, base_dtype, quantization)
    check_processes(gpus, sharding)
    if found.saved.chunked and gpus > 1:
        raise ConfigError(
            f"{found.model} was measured with the chunked loss, which training takes in one "
            f"process only: measure it with chunked_loss=False for {gpus} processes."
        )
    precision = PRECISIONS[dtype]
    frozen_bytes = BASE_DTYPES[base_dtype] if base_dtype else precision.frozen
    notes = list(found.notes)
    quantized = quantized_bytes = quantized_codes = workspace = 0.0
    if quantization is not None and not found.quantizable:
        raise TargetError(
            f"{found.model} has no frozen linear layers outside its output layer and task head "
            f"for {found.label}, so there is nothing to quantise: estimate it without quantization."
        )
    if quantization is not None:
        quantized = sum(layer.weight.numel() for layer in found.quantizable)
        quantized_bytes = sum(quantized_layer_bytes(m, quantization) for m in found.quantizable)
        quantized_codes = sum(quantized_codes_bytes(m, quantization) for m in found.quantizable)
        # bitsandbytes dequantises one layer's weight at a time, in the compute dtype
        workspace = max(m.weight.numel() for m in found.quantizable) * frozen_bytes
        notes.append(f"{int(quantized):,} frozen linear weights stored in {quantization}")
    frozen = found.total - found.trainable - quantized
    saved_bytes, recompute = found.saved.parts(gradient_checkpointing)
    # What FSDP shards: every parameter, frozen or trainable (a quantised weight's packed codes,
    # stored in a float dtype; its block constants stay whole on each process), and each
    # trainable parameter's gradient and optimizer state. Buffers are not sharded.
    sharded = frozen * frozen_bytes + quantized_codes + found.trainable * precision.weight
    whole = quantized_bytes - quantized_codes + found.method_buffers
    shards = gpus if sharding == "fsdp" else 1
    gathered = 0.0
    if sharding == "fsdp":
        gathered = _gathered(found, pass_dtype(dtype, base_dtype).itemsize, quantization)
        notes.append(
            f"per process of {gpus}: weights, gradients and optimizer state sharded by FSDP; "
            f"batch {found.batch_size} per process"
        )
    elif gpus > 1:
        notes.append(f"per process of {gpus}: each holds the whole model (DDP); batch "
                     f"{found.batch_size} per process")  # fmt: skip
    return MemoryEstimate(
        model=found.model,
        task=found.task,
        method=found.method,
        label=found.label,
        method_options=found.method_options,
        precision=dtype,
        batch_size=found.batch_size,
        seq_len=found.seq_len,
        gradient_checkpointing=gradient_checkpointing,
        total_parameters=found.total,
        trainable_parameters=found.trainable,
        added_parameters=found.added,
        # The method's own buffers (index tables) live as long as the weights.
        weights=sharded / shards + whole,
        # A frozen copy as the reference: a deep copy of the policy, its weights as stored.
        reference_copy=sharded + whole if found.frozen_copy else 0.0,
        generation=found.generation.peak if found.generation is not None else 0.0,
        gradients=found.trainable * precision.gradient / shards,
        optimizer=found.trainable * precision.optimizer / shards,
        activations=saved_bytes,
        loss_workspace=_loss_workspace(found),
        recompute=recompute,
        workspace=workspace,
        quantization=quantization,
        base_dtype=base_dtype,
        attention=found.attention,
        notes=notes,
        gpus=gpus,
        sharding=sharding,
        gathered=gathered,
        # Followed without checkpointing, which changes what the pass holds: then the moments.
        pass_peak=0.0
        if gradient_checkpointing
        else found.saved.highest(precision.gradient / shards),
    )


def _loss_workspace(found: Measurement) -> float:
    """The loss's float32 workspace: the whole logits and their gradient on the plain path,
    one chunk of them and the hidden states' gradient on the chunked path (nothing without a
    trainable parameter)."""
    if not found.trainable:
        return 0
    if found.saved.chunked:
        return found.saved.chunk_workspace
    return 2 * found.saved.logits * 4


def check_processes(gpus: int, sharding: str) -> None:
    """Refuse a process count below one or a sharding the estimator does not know."""
    check_sharding(sharding)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ConfigError(f"gpus must be a whole number of at least 1, got {gpus!r}.")


def _gathered(found: Measurement, compute_bytes: int, quantization: str | None) -> float:
    """FSDP2's working set of whole parameters: the root's own (kept gathered from the forward
    pass to the end of the backward pass) and the largest layer's, in the compute dtype."""
    if found.root is None:
        return 0.0
    layers = [b.gathered_bytes(compute_bytes, quantization) for b in found.blocks]
    return found.root.gathered_bytes(compute_bytes, quantization) + max(layers, default=0.0)


def estimate(
    model: Any,
    method: Any,
    batch_size: int = 1,
    seq_len: int = 512,
    dtype: str = "bf16-mixed",
    gradient_checkpointing: bool = False,
    *,
    task: str | None = None,
    attention: str = "auto",
    quantization: str | None = None,
    base_dtype: str | None = None,
    gpus: int = 1,
    sharding: str = "none",
    chunked_loss: bool = True,
    task_options: Any = None,
) -> MemoryEstimate:
    """Estimate one training step's memory by part (weights, gradients, AdamW, activations).

    model: a transformers config, config.json path or folder, bundled name, or named size
    (llama-7b, llama-13b, llama-70b). method: a method config object, a registered method's name
    (its default options), or a recipe's method section ({"name": NAME, OPTION: VALUE, ...}).
    task: the task type (default: the model's usual one). base_dtype: how the frozen base is
    stored (fp32, bf16, fp16; default: as the precision says). quantization: "nf4" or "int8"
    stores the frozen linear weights of the base in 4 or 8 bits, whatever the method; a method
    that changes the base's own weights is refused on a half-precision or quantised base.
    attention: the kernel modelled (activations.py): "auto" (default) is what SDPA runs on
    this machine, "fused" a GPU's FlashAttention or memory-efficient kernel, "cpu" SDPA on a
    CPU, "math" SDPA's math backend, "eager" transformers' eager attention.
    gpus, sharding: the memory of each of `gpus` processes, each at `batch_size`, holding the
    whole model ("none", DDP) or a shard of it ("fsdp"); a method that cannot be sharded is
    refused with its record's reason. chunked_loss: model a causal LM's loss as training makes it
    by default, through the head a chunk of tokens at a time (in one process only; False: the
    plain loss over the whole logits, as training in several processes computes it).
    task_options: the recipe's section for a task type with its own trainer (its `preference`,
    `kto` or `grpo` options, or a dict of them; None: the defaults): the step's shape
    (tasks/base.py StepShape, memory/task_step.py). For grpo, seq_len is the prompt's length
    and the step adds grpo.max_completion_length generated tokens."""
    check(dtype, base_dtype, quantization)
    check_processes(gpus, sharding)
    config = meta.method_config(method)
    refuse_low_bit_base(method_for_config(config), base_dtype, quantization)
    refuse_unshardable(method_for_config(config), sharding)
    found = measure(model, config, batch_size, seq_len, pass_dtype(dtype, base_dtype), task,
                    attention, chunked_loss and gpus == 1, task_options)  # fmt: skip
    return account(found, dtype, gradient_checkpointing, base_dtype, quantization, gpus, sharding)
