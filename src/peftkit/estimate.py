"""Estimate the memory of one training step by parts: weights, gradients, optimizer state (AdamW)
and activations, for full fine-tuning, LoRA, QLoRA, prompt tuning and BitFit, from a model config.

Parameters are counted exactly: the model is built on the meta device (shapes, no memory).
Activations are counted exactly too, for the model's own code: one forward pass runs on the meta
device, and every tensor autograd saves for the backward pass is recorded (each storage once) with
`torch.autograd.graph.saved_tensors_hooks`. Attention is modelled as a fused kernel (FlashAttention,
PyTorch SDPA's flash or memory-efficient backends), which saves q, k, v, its output and the
log-sum-exp; `attention="eager"` keeps transformers' eager attention, which stores the s x s
probabilities. See docs/estimate.md for the accounting and its validation."""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.errors import ConfigError

METHODS = ("full", "lora", "qlora", "prompt-tuning", "bitfit")
ATTENTION = ("fused", "eager")
GIB = 2**30

# Llama-2 shapes (Touvron et al., 2023, Table 1 and the released config.json files).
NAMED_SIZES: dict[str, dict[str, Any]] = {
    "llama-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama-13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                  "num_attention_heads": 40, "num_key_value_heads": 40},
    "llama-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                  "num_attention_heads": 64, "num_key_value_heads": 8},
}  # fmt: skip
_LLAMA2_COMMON = {"vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter in one precision regime, and the dtype activations are kept in."""

    name: str
    frozen: float  # a weight that does not train: its storage only
    weight: float  # a trainable weight's working copy
    gradient: float
    optimizer: float  # AdamW m and v, plus an fp32 master copy in mixed precision
    activation_dtype: torch.dtype
    help: str


PRECISIONS = {
    p.name: p
    for p in [
        Precision("fp32", 4, 4, 4, 8, torch.float32, "fp32 weights, gradients, m and v"),
        Precision(
            "bf16-mixed", 2, 2, 2, 12, torch.bfloat16,
            "bf16 weights and gradients; fp32 master copy, m and v (ZeRO paper accounting)",
        ),
        Precision(
            "fp16-mixed", 2, 2, 2, 12, torch.float16,
            "fp16 weights and gradients; fp32 master copy, m and v (ZeRO paper accounting)",
        ),
        Precision("bf16", 2, 2, 2, 4, torch.bfloat16, "pure bf16: weights, gradients, m, v"),
    ]
}  # fmt: skip

# QLoRA (Dettmers et al., 2023): NF4 storage is 4 bits a weight; double quantisation brings the
# block constants to 8-bit absmax per 64 weights plus one fp32 constant per 256 blocks.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass
class MemoryEstimate:
    """Estimated memory of one training step, in bytes, by part, and the peak they give.

    The peak is the largest of two moments: the start of the backward pass (every saved activation
    plus the loss-gradient buffers) and its end (every gradient; with gradient checkpointing also
    the layer inputs and the one layer being recomputed). Weights and optimizer state are live
    throughout. Gradients and activations are never all live at once: each layer's activations
    are freed as its gradients are made."""

    model: str
    method: str
    precision: str
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    total_parameters: int
    trainable_parameters: int
    weights: float
    gradients: float
    optimizer: float
    activations: float  # saved for backward, live when the backward pass starts
    loss_workspace: float  # fp32 gradients of the logits, made first in the backward pass
    recompute: float = 0.0  # gradient checkpointing: layer inputs plus one recomputed layer
    notes: list[str] = field(default_factory=list)

    @property
    def model_states(self) -> float:
        """Weights, gradients and optimizer state: the ZeRO paper's "model states"."""
        return self.weights + self.gradients + self.optimizer

    @property
    def phases(self) -> dict[str, float]:
        """Memory beyond weights and optimizer state at the two candidate peaks."""
        return {
            "backward start": self.activations + self.loss_workspace,
            "backward end": self.gradients + self.recompute,
        }

    @property
    def peak_phase(self) -> str:
        """Which moment of the step is the peak."""
        return max(self.phases, key=self.phases.__getitem__)

    @property
    def total(self) -> float:
        """The estimated peak memory of the training step."""
        return self.weights + self.optimizer + max(self.phases.values())

    def as_dict(self) -> dict[str, Any]:
        """The estimate as plain data for JSON (bytes, plus GiB for reading)."""
        names = ("weights", "gradients", "optimizer", "activations", "loss_workspace", "recompute")
        parts = {name: getattr(self, name) for name in names}
        parts["model_states"] = self.model_states
        parts["total"] = self.total
        return {
            "model": self.model,
            "method": self.method,
            "precision": self.precision,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "gradient_checkpointing": self.gradient_checkpointing,
            "total_parameters": self.total_parameters,
            "trainable_parameters": self.trainable_parameters,
            "peak_phase": self.peak_phase,
            "bytes": {k: int(v) for k, v in parts.items()},
            "gib": {k: v / GIB for k, v in parts.items()},
            "notes": self.notes,
        }

    def __str__(self) -> str:
        checkpointing = ", gradient checkpointing" if self.gradient_checkpointing else ""
        title = (
            f"{self.model}, {self.method}, {self.precision}, batch {self.batch_size} x "
            f"{self.seq_len} tokens{checkpointing}"
        )
        per_parameter = self.model_states / self.total_parameters if self.total_parameters else 0
        rows = [
            ("parameters", f"{self.total_parameters:,}"),
            ("trainable", f"{self.trainable_parameters:,}"),
            ("weights", _gib(self.weights)),
            ("gradients", _gib(self.gradients)),
            ("optimizer (AdamW)", _gib(self.optimizer)),
            ("model states", f"{_gib(self.model_states)} ({per_parameter:.2f} B/param)"),
            ("activations", _gib(self.activations)),
            ("loss workspace", _gib(self.loss_workspace)),
        ]
        if self.gradient_checkpointing:
            rows.append(("recompute", _gib(self.recompute)))
        rows.append((f"peak ({self.peak_phase})", _gib(self.total)))
        width = max(len(name) for name, _ in rows)
        lines = [title] + [f"  {name:<{width}}  {value:>14}" for name, value in rows]
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


def _gib(value: float) -> str:
    """Bytes as GiB, for tables."""
    return f"{value / GIB:,.2f} GiB"


def resolve_config(config: Any) -> tuple[Any, str]:
    """A transformers config and a display name, from an object, a config.json path, a bundled
    model name or a named size such as "llama-7b"."""
    import transformers

    if isinstance(config, transformers.PretrainedConfig):
        return config, getattr(config, "model_type", "model")
    name = str(config)
    if name in NAMED_SIZES:
        return transformers.LlamaConfig(**_LLAMA2_COMMON, **NAMED_SIZES[name]), name
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        data = json.loads(path.read_text())
        return transformers.AutoConfig.for_model(**data), name
    from peftkit import models

    if name.startswith("tiny-"):
        return models.tiny_config(name.removeprefix("tiny-")), name
    if name == "minilm":
        return transformers.AutoConfig.from_pretrained(models.minilm_folder()), name
    if name == "smollm2-135m":
        return transformers.AutoConfig.from_pretrained(models.smollm2_folder()), name
    raise ConfigError(
        f"Cannot find a model config for {name!r}: give a transformers config, a config.json path, "
        f"a bundled name ({', '.join(models.bundled_names())}) or a named size "
        f"({', '.join(NAMED_SIZES)})."
    )


def meta_model(config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model a config describes, on the meta device: exact shapes, no memory."""
    import transformers

    config = copy.deepcopy(config)  # the meta pass adjusts it; the caller's stays as it was
    kind = type(config)
    if getattr(config, "is_encoder_decoder", False):
        auto = transformers.AutoModelForSeq2SeqLM
    elif kind in transformers.MODEL_FOR_MASKED_LM_MAPPING and not config.is_decoder:
        # An encoder (BERT) is fine-tuned with a classification head, as peftkit's tasks do.
        auto = transformers.AutoModelForSequenceClassification
    elif kind in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        auto = transformers.AutoModelForCausalLM
    else:
        auto = transformers.AutoModel
    with torch.device("meta"):
        return auto.from_config(config, dtype=dtype)


def unique_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Named parameters with each shared tensor (tied embeddings) once."""
    return list(model.named_parameters())  # remove_duplicate=True is the default


def lora_parameters(model: nn.Module, rank: int, targets: Any) -> tuple[int, list[str]]:
    """LoRA's trainable count r (in + out) over the targeted layers, and their names."""
    from peftkit.targeting import resolve_targets

    names = resolve_targets(model, targets)
    modules = dict(model.named_modules())
    total = 0
    for name in names:
        weight = modules[name].weight
        # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out): either way in + out.
        total += rank * (weight.shape[0] + weight.shape[1])
    return total, names


def _quantised_parameters(model: nn.Module) -> int:
    """Weights QLoRA stores in NF4: the linear layers inside the model, not the output layer."""
    from peftkit.targeting import is_linear

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sum(m.weight.numel() for m in model.modules() if is_linear(m) and m is not output)


@dataclass
class _Saved:
    """Bytes autograd saved in one forward, inside the transformer layers and outside them."""

    per_layer: list[int]
    outside: int


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


def _layers(model: nn.Module) -> list[nn.Module]:
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


@contextlib.contextmanager
def _record_saved(model: nn.Module) -> Iterator[_Saved]:
    """Record the bytes of every tensor autograd saves (each storage once), by layer."""
    layers = _layers(model)
    saved = _Saved([0] * len(layers), 0)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: set[int] = set()
    current: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in params and storage._cdata not in seen:
            seen.add(storage._cdata)
            if current:
                saved.per_layer[current[-1]] += storage.nbytes()
            else:
                saved.outside += storage.nbytes()
        return tensor

    def leave(*_: Any) -> None:
        current.pop()

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(lambda *_, i=index: current.append(i)))
        handles.append(layer.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield saved
    finally:
        for handle in handles:
            handle.remove()


def _trainable_setup(
    model: nn.Module, method: str, rank: int, targets: Any, lora_dropout: float
) -> nn.Module:
    """Set which parameters train for a method (LoRA layers added through PEFT, on meta)."""
    if method == "full":
        return model.requires_grad_(True)
    model.requires_grad_(False)
    if method == "bitfit":
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.endswith("bias"))
    if method in ("lora", "qlora"):
        import peft

        from peftkit.targeting import default_targets

        spec = targets if targets is not None else default_targets(model)
        lora = peft.LoraConfig(r=rank, target_modules=spec, lora_dropout=lora_dropout)
        with torch.device("meta"):
            model = peft.get_peft_model(model, lora)
    for _, parameter in _head_parameters(model):
        parameter.requires_grad_(True)
    return model


def task_type(model: nn.Module) -> str | None:
    """PEFT's task type for a model (peftkit.targeting's rule)."""
    from peftkit.targeting import task_type as kind

    return kind(model)


def saved_activations(
    model: nn.Module,
    config: Any,
    method: str,
    batch_size: int,
    seq_len: int,
    rank: int,
    targets: Any,
    lora_dropout: float,
    attention: str,
) -> _Saved:
    """One meta-device forward pass in training mode, recording what autograd saves."""
    from transformers import AttentionInterface

    if attention == "fused":
        AttentionInterface.register("peftkit_fused", _fused_attention)
        model.set_attn_implementation("peftkit_fused")
    else:
        model.set_attn_implementation("eager")
    # transformers checks input_ids for padding tokens, which reads values meta tensors lack.
    model.config.pad_token_id = None
    model = _trainable_setup(model, method, rank, targets, lora_dropout)
    model.train()
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    inputs: dict[str, Any] = {"input_ids": ids, "labels": ids}
    if task_type(model) == "SEQ_CLS":
        inputs["labels"] = torch.zeros(batch_size, dtype=torch.long, device="meta")
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    elif "labels" not in _forward_arguments(model):
        inputs.pop("labels")
    if method == "prompt-tuning":
        # The soft prompt trains, so gradients flow back to the (lengthened) input embeddings.
        embeddings = model.get_input_embeddings()(inputs.pop("input_ids"))
        inputs["inputs_embeds"] = embeddings.detach().requires_grad_(True)
    with _record_saved(model) as saved:
        output = model(**inputs)
        if getattr(output, "loss", None) is None:
            output[0].float().pow(2).mean()  # a bare backbone: stand-in loss on its output
    return saved


def _forward_arguments(model: nn.Module) -> set[str]:
    """The keyword names a model's forward accepts."""
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _activation_parts(saved: _Saved, layer_input: int, checkpointing: bool) -> tuple[int, int]:
    """(saved at the start of the backward pass, recompute): with gradient checkpointing each
    layer keeps only its input, and one layer at a time is recomputed during the backward pass."""
    if not checkpointing or not saved.per_layer:
        return sum(saved.per_layer) + saved.outside, 0
    layer_inputs = len(saved.per_layer) * layer_input
    return layer_inputs + saved.outside, layer_inputs + max(saved.per_layer)


def loss_workspace(model: nn.Module, batch_size: int, seq_len: int, vocab_size: int) -> int:
    """The backward pass starts with fp32 gradients of the log-softmax and of the logits."""
    has_head = hasattr(model, "get_output_embeddings") and model.get_output_embeddings()
    return 2 * batch_size * seq_len * vocab_size * 4 if has_head else 0


def _trainable(
    model: nn.Module,
    config: Any,
    method: str,
    lora_rank: int,
    lora_targets: Any,
    num_virtual_tokens: int,
) -> tuple[int, int, list[str]]:
    """(trainable parameters, weights stored in NF4, notes) for a method on a meta model."""
    trainable, quantised, notes = _method_parameters(
        model, config, method, lora_rank, lora_targets, num_virtual_tokens
    )
    if method == "full":
        return trainable, quantised, notes
    head = _head_parameters(model)
    # A new classification head trains with every method (BitFit has counted its bias already).
    head_biases = sum(p.numel() for n, p in head if n.endswith("bias")) if method == "bitfit" else 0
    return trainable + sum(p.numel() for _, p in head) - head_biases, quantised, notes


def _head_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters of a fresh task head (a classifier), which train with any method."""
    from peftkit.targeting import task_head_modules

    heads = task_head_modules(model)
    return [(n, p) for n, p in unique_parameters(model) if n.split(".")[0] in heads]


def _method_parameters(
    model: nn.Module,
    config: Any,
    method: str,
    lora_rank: int,
    lora_targets: Any,
    num_virtual_tokens: int,
) -> tuple[int, int, list[str]]:
    """The parameters a method itself trains, before any task head."""
    if method == "full":
        return sum(p.numel() for _, p in unique_parameters(model)), 0, []
    if method in ("lora", "qlora"):
        trainable, _ = lora_parameters(model, lora_rank, lora_targets)
        if method == "lora":
            return trainable, 0, []
        quantised = _quantised_parameters(model)
        return trainable, quantised, [f"{quantised:,} linear weights in NF4, double quantised"]
    if method == "prompt-tuning":
        note = f"{num_virtual_tokens} virtual tokens lengthen every sequence"
        return num_virtual_tokens * config.hidden_size, 0, [note]
    biases = sum(p.numel() for n, p in unique_parameters(model) if n.endswith("bias"))
    return biases, 0, [] if biases else ["this architecture has no bias terms: nothing trains"]


def estimate(
    config: Any,
    method: str = "full",
    batch_size: int = 1,
    seq_len: int = 512,
    dtype: str = "bf16-mixed",
    gradient_checkpointing: bool = False,
    lora_rank: int = 8,
    lora_targets: str | Sequence[str] | None = None,
    lora_dropout: float = 0.05,
    num_virtual_tokens: int = 20,
    attention: str = "fused",
) -> MemoryEstimate:
    """Estimate the memory of one training step by part (weights, gradients, AdamW, activations)."""
    for value, valid, what in [(method, METHODS, "method"), (dtype, PRECISIONS, "dtype"),
                               (attention, ATTENTION, "attention")]:  # fmt: skip
        if value not in valid:
            raise ConfigError(f"Unknown {what} {value!r}; use one of: {', '.join(valid)}.")
    if batch_size < 1 or seq_len < 1:
        raise ConfigError(f"batch_size and seq_len must be at least 1: {batch_size}, {seq_len}.")
    config, name = resolve_config(config)
    precision = PRECISIONS[dtype]
    model = meta_model(config, precision.activation_dtype)
    total = sum(p.numel() for _, p in unique_parameters(model))
    trainable, quantised, notes = _trainable(
        model, config, method, lora_rank, lora_targets, num_virtual_tokens
    )
    # LoRA and prompt tuning add their parameters; full fine-tuning and BitFit train the model's.
    added = method in ("lora", "qlora", "prompt-tuning")
    frozen = total if added else total - trainable
    tokens = seq_len + (num_virtual_tokens if method == "prompt-tuning" else 0)
    saved = saved_activations(
        model, config, method, batch_size, tokens, lora_rank, lora_targets, lora_dropout, attention
    )
    dtype_bytes = torch.finfo(precision.activation_dtype).bits // 8
    layer_input = batch_size * tokens * config.hidden_size * dtype_bytes
    activations, recompute = _activation_parts(saved, layer_input, gradient_checkpointing)
    return MemoryEstimate(
        model=name,
        method=method,
        precision=dtype,
        batch_size=batch_size,
        seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing,
        total_parameters=total + trainable if added else total,
        trainable_parameters=trainable,
        weights=(frozen - quantised) * precision.frozen
        + quantised * NF4_BYTES
        + trainable * precision.weight,
        gradients=trainable * precision.gradient,
        optimizer=trainable * precision.optimizer,
        activations=activations,
        loss_workspace=loss_workspace(model, batch_size, tokens, config.vocab_size)
        if trainable
        else 0,
        recompute=recompute,
        notes=notes,
    )


def compare(
    model: Any = "llama-7b",
    methods: Sequence[str] = ("full", "lora"),
    dtypes: Sequence[str] = ("bf16-mixed", "fp32"),
    batch_size: int = 1,
    seq_len: int = 512,
    gradient_checkpointing: bool = False,
    lora_rank: int = 8,
    lora_targets: str | Sequence[str] | None = None,
) -> list[MemoryEstimate]:
    """One estimate per (dtype, method) pair, for a side-by-side table."""
    return [
        estimate(model, method, batch_size, seq_len, dtype, gradient_checkpointing,
                 lora_rank=lora_rank, lora_targets=list(lora_targets) if lora_targets else None)
        for dtype in dtypes
        for method in methods
    ]  # fmt: skip


def markdown_table(estimates: Sequence[MemoryEstimate]) -> str:
    """Estimates side by side as a Markdown table, in GiB, one column per estimate."""
    heads = [
        f"{e.method}, {e.precision}" + (", checkpointing" if e.gradient_checkpointing else "")
        for e in estimates
    ]
    rows = [
        ("trainable parameters", [f"{e.trainable_parameters:,}" for e in estimates]),
        ("weights", [_gib(e.weights) for e in estimates]),
        ("gradients", [_gib(e.gradients) for e in estimates]),
        ("optimizer (AdamW)", [_gib(e.optimizer) for e in estimates]),
        ("model states", [_gib(e.model_states) for e in estimates]),
        ("  per parameter", [f"{e.model_states / e.total_parameters:.2f} B" for e in estimates]),
        ("activations", [_gib(e.activations) for e in estimates]),
        ("loss workspace", [_gib(e.loss_workspace) for e in estimates]),
        ("**peak**", [f"**{_gib(e.total)}** ({e.peak_phase})" for e in estimates]),
    ]  # fmt: skip
    lines = ["| | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(values) + " |" for name, values in rows]
    return "\n".join(lines)


def main_table(
    model: Any = "llama-7b",
    batch_size: int = 1,
    seq_len: int = 512,
    gradient_checkpointing: bool = False,
    lora_rank: int = 8,
) -> str:
    """The README table: full fine-tuning vs LoRA (q, v) in bf16 mixed precision and fp32."""
    first = compare(model, batch_size=batch_size, seq_len=seq_len,
                    gradient_checkpointing=gradient_checkpointing, lora_rank=lora_rank)  # fmt: skip
    title = (
        f"{first[0].model}: {first[0].total_parameters:,} parameters, batch {batch_size} x "
        f"{seq_len} tokens, AdamW, LoRA r={lora_rank} on the query and value projections"
    )
    return title + "\n\n" + markdown_table(first)
