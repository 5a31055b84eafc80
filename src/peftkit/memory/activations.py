"""What a training step keeps for its backward pass, measured rather than modelled.

One forward pass of the applied model runs on the meta device in training mode, and every tensor
autograd saves for the backward pass is recorded (each storage once; parameters and buffers, which
live anyway, left out) with `torch.autograd.graph.saved_tensors_hooks`, attributed to the
transformer layer that saved it. So whatever the method runs is counted as it runs: dropout masks
on an added path, weight norms, added layers, virtual tokens lengthening the sequence, keys and
values waiting in the cache, a parametrized weight's fresh copy. Attention runs as the kernel
named (`ATTENTION`): "fused" (FlashAttention, SDPA's flash or memory-efficient backends) saves
q, k, v, its output and the log-sum-exp; "math" runs SDPA's math backend, which saves the
s x s probabilities of every head, their dropout mask and the dropped copy; "cpu" is what SDPA
runs on a CPU (its flash kernel, or the math backend in a layer whose attention dropout is on
in training: the CPU flash kernel has no dropout); "eager" runs transformers' eager attention.
"auto" is what SDPA would run on this machine: "fused" with a GPU, "cpu" without."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from peftkit.models import chunked_loss

ATTENTION = ("auto", "fused", "math", "cpu", "eager")


@dataclass
class SavedTensors:
    """What one forward pass saved for the backward pass, and the shapes the method made."""

    per_layer: list[int]  # bytes autograd saved inside each transformer layer
    outside: int = 0  # bytes saved outside the layers (embeddings, head, loss)
    layer_inputs: list[int] = field(default_factory=list)  # bytes of each layer's input states
    sequence: int = 0  # the first layer's sequence length (virtual tokens included)
    logits: int = 0  # elements of the output layer's result (0: no language-model head)
    # The pass's live bytes (activations and temporaries, parameters left out) at its highest
    # point for each count of gradient elements made so far: {gradient elements: live bytes}.
    live: dict[int, int] = field(default_factory=dict)
    # The chunked causal-LM loss (models/chunked_loss.py) made the loss: the whole logits never
    # existed. Its workspace: one chunk's float32 logits three times over (the logits, the
    # log-sum-exp's temporary, the softmax made in place from them) plus the scaled copy of the
    # kept hidden-state gradient ([tokens, hidden]) that its backward returns.
    chunked: bool = False
    chunk_workspace: int = 0

    def highest(self, gradient_bytes: float) -> float:
        """The most memory the forward and backward pass held at once beyond weights and
        optimizer state: live activations and temporaries plus the gradients made so far, at
        `gradient_bytes` a gradient element (0: the pass could not be followed)."""
        return max((live + made * gradient_bytes for made, live in self.live.items()), default=0)

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


def _math_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kwargs: Any,
) -> Any:
    """transformers' SDPA attention forced onto SDPA's math backend (scores, softmax, dropout
    and the product with v as separate saved steps)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with sdpa_kernel([SDPBackend.MATH]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _cpu_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kwargs: Any,
) -> Any:
    """What SDPA runs on a CPU: the flash kernel, unless attention dropout applies (the CPU
    flash kernel has none), then the math backend."""
    kernel = _math_attention if kwargs.get("dropout", 0.0) else _fused_attention
    return kernel(module, query, key, value, attention_mask, **kwargs)


def resolve_attention(attention: str) -> str:
    """The attention kernel an estimate models: "auto" is SDPA's choice on this machine."""
    if attention != "auto":
        return attention
    return "fused" if torch.cuda.is_available() else "cpu"


def set_attention(model: nn.Module, attention: str) -> None:
    """Run attention as the named kernel saves it (module docstring), or as transformers' eager
    code does."""
    kernels = {"fused": _fused_attention, "math": _math_attention, "cpu": _cpu_attention}
    attention = resolve_attention(attention)
    if attention in kernels:
        from transformers import AttentionInterface

        AttentionInterface.register(f"peftkit_{attention}", kernels[attention])
        model.set_attn_implementation(f"peftkit_{attention}")
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


class _LiveBytes(TorchDispatchMode):
    """Follows every tensor the pass makes to the storage behind it, and the storage's bytes
    while any tensor holding it lives: the running total an allocator would see, parameters and
    buffers left out. A trainable parameter's gradient moves, once made, from the running total
    to the count of gradient elements (the accounting prices a gradient by the precision)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.persistent = {t.untyped_storage()._cdata for t in [*model.parameters(),
                                                                *model.buffers()]}  # fmt: skip
        self.storages: dict[int, list[int]] = {}  # storage -> [tensors alive, bytes]
        self.gradients: set[int] = set()
        self.running = 0
        self.made = 0  # gradient elements made so far
        self.live: dict[int, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        """Run the operation and follow what it returns."""
        result = func(*args, **(kwargs or {}))
        for value in tree_leaves(result):
            if isinstance(value, torch.Tensor):
                self.follow(value)
        return result

    def follow(self, tensor: torch.Tensor) -> None:
        """Count a tensor's storage while the tensor lives."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.persistent:
            return
        entry = self.storages.setdefault(key, [0, 0])
        if key not in self.gradients and storage.nbytes() > entry[1]:
            self.running += storage.nbytes() - entry[1]
            entry[1] = storage.nbytes()
            self.live[self.made] = max(self.live.get(self.made, 0), self.running)
        entry[0] += 1
        weakref.finalize(tensor, self.release, key)

    def release(self, key: int) -> None:
        """A tensor died: free its storage's bytes when it was the last one holding it."""
        entry = self.storages.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] <= 0:
            del self.storages[key]
            if key not in self.gradients:
                self.running -= entry[1]

    def gradient_made(self, parameter: torch.Tensor) -> None:
        """A parameter's gradient exists: count it as gradient elements from now on."""
        grad = parameter.grad
        key = grad.untyped_storage()._cdata if grad is not None else None
        if grad is None or key in self.gradients:
            return
        entry = self.storages.get(key)
        if entry is not None:
            self.running -= entry[1]
        self.gradients.add(key)
        self.made += grad.numel()
        self.live[self.made] = max(self.live.get(self.made, 0), self.running)


def _gradient_hooks(model: nn.Module, made: Callable[[torch.Tensor], None]) -> list[Any]:
    """A post-accumulate hook on each trainable parameter, calling `made` with it."""
    return [p.register_post_accumulate_grad_hook(made) for p in model.parameters()
            if p.requires_grad]  # fmt: skip


def chunk_workspace(tokens: int, head: Any) -> int:
    """Bytes the chunked loss holds beyond what it saves: one chunk's float32 logits three
    times over and a float32 [tokens, hidden] copy of the hidden states' gradient."""
    vocab, hidden = head.module.out_features, head.module.in_features
    rows = min(tokens, chunked_loss.chunk_rows(vocab))
    return 3 * rows * vocab * 4 + tokens * hidden * 4


def _follows_logits(model: nn.Module, inputs: dict[str, Any], head: Any) -> bool:
    """Whether the chunked loss can follow the model: its forward returns the head's output
    unchanged (prompt tuning's hooks cut the virtual positions off the logits)."""
    features = {key: value for key, value in inputs.items() if key != "labels"}
    with chunked_loss.hidden_states_of(head) as kept:
        outputs = model(**features)
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    return logits is kept.get("stand_in")


def _loss(model: nn.Module, inputs: dict[str, Any], head: Any, saved: SavedTensors) -> Any:
    """The training loss as the trainer makes it: through the chunked head where `head` is
    given, else the model's own. (chunked_loss's causal_lm_loss picks the labelled rows by a
    mask, which meta tensors cannot: here every position is labelled but each row's last, so
    the rows are a slice.)"""
    if head is None:
        return getattr(model(**inputs), "loss", None)
    features = {key: value for key, value in inputs.items() if key != "labels"}
    with chunked_loss.hidden_states_of(head) as kept:
        model(**features)
    hidden = kept["hidden"][:, :-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = inputs["labels"][:, 1:].reshape(-1)
    saved.chunked = True
    saved.chunk_workspace = chunk_workspace(hidden.shape[0], head)
    module = head.module
    return chunked_loss.linear_cross_entropy(
        hidden, module.weight, module.bias, targets, hidden.shape[0], head.softcap
    )


def saved_tensors(
    model: nn.Module,
    base: nn.Module,
    layers: list[nn.Module],
    batch_size: int,
    seq_len: int,
    head: Any = None,
) -> SavedTensors:
    """One training-mode forward pass of the applied `model` (wrapping `base`) on the meta device,
    with the loss, recording what autograd saves; then the backward pass, following the live
    bytes of both (`SavedTensors.live`; left empty where the backward pass cannot run on meta).
    `head` (chunked_loss.find_head's): the loss goes through the chunked head, as in training."""
    output_layer = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    inputs = training_inputs(base, batch_size, seq_len)
    # Training makes one no-gradient eval-mode forward before step 0 (training/run.py), so
    # whatever a method sets up on its first forward (the fast path grouping its layers, which
    # holds each layer's input until that forward ends) is set up before the step: so here.
    model.eval()
    with torch.no_grad():
        model(**inputs)
        if head is not None and not _follows_logits(model, inputs, head):
            head = None  # the trainer falls back to the model's own loss
    model.train()
    tracker = _LiveBytes(model)
    hooks = _gradient_hooks(model, tracker.gradient_made)
    try:
        with tracker:
            with _recording(model, layers, output_layer) as saved:
                loss = _loss(model, inputs, head, saved)  # alive until the tally
            if loss is not None and loss.requires_grad:
                try:
                    loss.backward()
                    saved.live = dict(tracker.live)
                except (RuntimeError, NotImplementedError):
                    pass  # an operation with no meta kernel: the two moments alone
            del loss
    finally:
        for hook in hooks:
            hook.remove()
        for parameter in model.parameters():
            parameter.grad = None
    return saved
