"""What a training step keeps for its backward pass, measured rather than modelled.

One forward pass of the applied model runs on the meta device in training mode, and every tensor
autograd saves for the backward pass is recorded (each storage once; parameters and buffers, which
live anyway, left out) with `torch.autograd.graph.saved_tensors_hooks`, attributed to the
transformer layer that saved it. So whatever the method runs is counted as it runs: dropout masks
on an added path, weight norms, added layers, virtual tokens lengthening the sequence, keys and
values waiting in the cache, a parametrized weight's fresh copy. Attention is modelled as a fused
kernel (FlashAttention, SDPA's flash or memory-efficient backends), which saves q, k, v, its
output and the log-sum-exp; `attention="eager"` keeps transformers' eager attention, which
stores the s x s probabilities."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

ATTENTION = ("fused", "eager")


@dataclass
class SavedTensors:
    """What one forward pass saved for the backward pass, and the shapes the method made."""

    per_layer: list[int]  # bytes autograd saved inside each transformer layer
    outside: int = 0  # bytes saved outside the layers (embeddings, head, loss)
    layer_inputs: list[int] = field(default_factory=list)  # bytes of each layer's input states
    sequence: int = 0  # the first layer's sequence length (virtual tokens included)
    logits: int = 0  # elements of the output layer's result (0: no language-model head)

    def parts(self, checkpointing: bool) -> tuple[int, int]:
        """(saved when the backward pass starts, recompute): with gradient checkpointing each
        layer keeps only its input, and one layer at a time is recomputed in the backward pass."""
        if not checkpointing or not self.per_layer:
            return sum(self.per_layer) + self.outside, 0
        inputs = sum(self.layer_inputs)
        return inputs + self.outside, inputs + max(self.per_layer)


class _FusedAttention(torch.autograd.Function):
    """Stands in for a fused attention kernel: saves q, k, v, output and log-sum-exp only."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> Any:
        output = torch.empty_like(query)
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, output, lse)
        return output

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # pragma: no cover (meta pass only)
        query, key, value, _, _ = ctx.saved_tensors
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)


def _fused_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kwargs: Any,
) -> Any:
    """A transformers attention function (same signature as theirs) over _FusedAttention."""
    output = _FusedAttention.apply(query, key, value)
    return output.transpose(1, 2), None  # transformers expects (batch, seq, heads, head_dim)


def set_attention(model: nn.Module, attention: str) -> None:
    """Run attention as a fused kernel would save it, or as transformers' eager code does."""
    if attention == "fused":
        from transformers import AttentionInterface

        AttentionInterface.register("peftkit_fused", _fused_attention)
        model.set_attn_implementation("peftkit_fused")
    else:
        model.set_attn_implementation("eager")


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer layers: modules in a ModuleList whose class the model says must
    not be split (BERT also names its embeddings there, which are not a repeated layer)."""
    kinds = set(getattr(model, "_no_split_modules", None) or [])
    return [
        layer
        for stack in model.modules()
        if isinstance(stack, nn.ModuleList)
        for layer in stack
        if type(layer).__name__ in kinds
    ]


def training_inputs(model: nn.Module, batch_size: int, seq_len: int) -> dict[str, Any]:
    """A batch of meta tensors shaped as the task feeds the model, labels included."""
    from peftkit.targeting import task_type

    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    inputs: dict[str, Any] = {"input_ids": ids, "labels": ids}
    if task_type(model) == "SEQ_CLS":
        inputs["labels"] = torch.zeros(batch_size, dtype=torch.long, device="meta")
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    return inputs


@contextlib.contextmanager
def _recording(model: nn.Module, layers: list[nn.Module], output_layer: Any) -> Iterator[Any]:
    """Record saved tensors by layer, each layer's input, and the output layer's size. The bytes
    are tallied when the pass ends, over the saved tensors still alive then: a branch of the graph
    dropped during the pass (a detached norm) frees what it saved."""
    saved = SavedTensors([0] * len(layers), layer_inputs=[0] * len(layers))
    kept: list[tuple[weakref.ref, int | None]] = []
    current: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept.append((weakref.ref(tensor), current[-1] if current else None))
        return tensor

    def enter(index: int, args: tuple, kwargs: dict[str, Any]) -> None:
        current.append(index)
        states = args[0] if args else kwargs.get("hidden_states")
        if isinstance(states, torch.Tensor):
            saved.layer_inputs[index] = states.numel() * states.element_size()
            saved.sequence = saved.sequence or states.shape[-2]

    def leave(*_: Any) -> None:
        current.pop()

    def record_logits(module: nn.Module, args: tuple, output: Any) -> None:
        saved.logits += output.numel() if isinstance(output, torch.Tensor) else 0

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(
            lambda _, args, kwargs, i=index: enter(i, args, kwargs), with_kwargs=True
        ))  # fmt: skip
        handles.append(layer.register_forward_hook(leave))
    if output_layer is not None:
        handles.append(output_layer.register_forward_hook(record_logits))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield saved
        _tally(saved, kept, model)
    finally:
        for handle in handles:
            handle.remove()


def _tally(saved: SavedTensors, kept: list[tuple[weakref.ref, int | None]], model: Any) -> None:
    """Add the bytes of each storage still saved (once; parameters and buffers live anyway) to
    the layer that first saved it. Only live storages are compared, so no address is reused."""
    persistent = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    seen: set[int] = set()
    for reference, layer in kept:
        tensor = reference()
        if tensor is None:
            continue
        storage = tensor.untyped_storage()
        if storage._cdata in persistent or storage._cdata in seen:
            continue
        seen.add(storage._cdata)
        if layer is None:
            saved.outside += storage.nbytes()
        else:
            saved.per_layer[layer] += storage.nbytes()


def saved_tensors(
    model: nn.Module, base: nn.Module, layers: list[nn.Module], batch_size: int, seq_len: int
) -> SavedTensors:
    """One training-mode forward pass of the applied `model` (wrapping `base`) on the meta device,
    with the loss, recording what autograd saves."""
    output_layer = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    model.train()
    with _recording(model, layers, output_layer) as saved:
        output = model(**training_inputs(base, batch_size, seq_len))  # alive until the tally
    del output
    return saved
