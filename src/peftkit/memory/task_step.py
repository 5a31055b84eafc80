"""One step of a task type with its own trainer (TRL's: DPO, KTO, GRPO), followed on the meta
device as the trainer runs it. The task type's record says the step's shape (tasks/base.py
`StepShape`): how many sequences per batch row the policy forwards with gradient, which
no-gradient passes (the policy's, the reference's) run before that forward and which after it,
while its activations wait for the backward pass, and how many tokens it generates first.

Every pass scores tokens through TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`,
the one TRL 1.16's DPO, KTO and GRPO trainers add): the log-probabilities a tile of
[4,096 tokens, 32,768 vocabulary entries] at a time, whatever the vocabulary's size, so the tile
buffer is what dominates a small model's step. The patched model runs here on meta tensors, so
its tile buffers, temporaries and fp32 gradient accumulators are followed as allocated (on a
CPU it scores every position; on a GPU with Triton only the completion's, which it holds fewer
of). A reference pass runs the model with its adapter switched off through the method record's
`switch_off`, or, for a method that has none, the same model standing in for the frozen copy
(same shapes), whose weights the accounting adds.

Generation (GRPO's rollouts through transformers' `generate`) is modelled from measured parts:
the prefill's no-gradient pass with its KV cache, followed on meta, and the cache grown to
prompt + completion tokens (its bytes per position measured on meta), plus, at the last decode
step, one layer's keys copied as the cache grows and the sampling's float32 copies of the
next-token logits (four [rows, vocabulary] tensors: the logits, the temperature's, the
softmax's and the sampling's)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftkit.errors import ConfigError
from peftkit.memory import activations

TILE_TOKENS = 4096  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE
TILE_VOCAB = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
SAMPLING_COPIES = 4  # float32 [rows, vocabulary] tensors a sampling step holds


@dataclass
class Generation:
    """What a step's rollouts hold at their highest (bytes), and its parts."""

    prefill: int  # the prefill's followed peak: its transient and the cache of the prompt
    cache: int  # the KV cache of every row at prompt + completion tokens
    decode: int  # the last decode step's extra: one layer's keys copied, the sampling copies

    @property
    def peak(self) -> int:
        """The rollout phase's highest point."""
        return max(self.prefill, self.cache + self.decode)


def fused_head_workspace(tokens: int, hidden: int, vocab: int, dtype_bytes: int,
                         head_trains: bool) -> int:  # fmt: skip
    """Bytes TRL's fused head holds in its backward pass: the tile buffer, the tile's float32
    temporaries (its copy, the probabilities, the gradient and the target mask's), the float32
    hidden-state gradient, and the output layer's float32 gradient where the head trains."""
    rows, width = min(tokens, TILE_TOKENS), min(vocab, TILE_VOCAB)
    tile = rows * TILE_VOCAB * dtype_bytes + 4 * rows * width * 4
    return tile + tokens * hidden * 4 + (vocab * hidden * 4 if head_trains else 0)


def _patch_fused_head(base: nn.Module) -> None:
    """TRL's fused LM head on the transformers model, as TRL's trainers add it."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(base)


@contextlib.contextmanager
def _no_meta_autocast() -> Iterator[None]:
    """torch.is_autocast_enabled("meta") raises (no autocast for meta); TRL's fused head asks
    it of its input's device: answer no for meta while the head runs, then restore."""
    original = torch.is_autocast_enabled

    def enabled(*args: Any) -> bool:
        return False if args and args[0] == "meta" else original(*args)

    torch.is_autocast_enabled = enabled
    try:
        yield
    finally:
        torch.is_autocast_enabled = original


def _scored(model: nn.Module, rows: int, seq_len: int) -> torch.Tensor:
    """The summed log-probabilities of `rows` sequences through the fused head."""
    ids = torch.zeros(rows, seq_len, dtype=torch.long, device="meta")
    try:
        with _no_meta_autocast():
            output = model(input_ids=ids, labels=ids, fused_lm_head=True, use_cache=False)
    except TypeError as error:
        raise ConfigError(
            f"the estimator cannot run this method under TRL's fused LM head ({error}); "
            "TRL's trainers refuse a method that wraps the model in a module of its own."
        ) from None
    return output.log_probs.sum()


def _no_grad_pass(model: nn.Module, which: str, switch: Any, rows: int, seq_len: int) -> None:
    """One no-gradient pass: the policy, or the reference (switched off where it can be)."""
    off = switch(model) if which == "reference" and switch is not None else None
    with torch.no_grad(), off() if off is not None else contextlib.nullcontext():
        _scored(model, rows, seq_len)


def follow_step(
    model: nn.Module,
    base: nn.Module,
    layers: list[nn.Module],
    batch_size: int,
    seq_len: int,
    shape: Any,
    switch: Any,
) -> activations.SavedTensors:
    """The step `shape` describes over `batch_size` rows of `seq_len` tokens (prompt plus
    generated ones), followed on meta: what the gradient pass saves (by layer), and the live
    bytes of every pass in order (`SavedTensors.live`). `switch`: the method record's
    switch_off (None: a frozen copy stands in as the reference)."""
    _patch_fused_head(base)
    rows = shape.sequences * batch_size
    output_layer = base.get_output_embeddings()
    head = output_layer.weight
    model.eval()
    with torch.no_grad():  # the first no-gradient forward training makes before step 0
        _scored(model, batch_size, seq_len)
    model.train()
    tracker = activations._LiveBytes(model)
    hooks = activations._gradient_hooks(model, tracker.gradient_made)
    try:
        with tracker:
            for which in shape.before:
                _no_grad_pass(model, which, switch, rows, seq_len)
            with activations._recording(model, layers, output_layer) as saved:
                loss = _scored(model, rows, seq_len)
                for which in shape.after:
                    _no_grad_pass(model, which, switch, rows, seq_len)
            try:
                loss.backward()
                saved.live = dict(tracker.live)
            except (RuntimeError, NotImplementedError):
                pass  # an operation with no meta kernel: the moments alone
            del loss
    finally:
        for hook in hooks:
            hook.remove()
        for parameter in model.parameters():
            parameter.grad = None
    tokens = rows * (seq_len - 1)
    saved.chunked = True
    saved.chunk_workspace = fused_head_workspace(
        tokens, head.shape[1], head.shape[0], head.element_size(), head.requires_grad
    )
    return saved


def _cache_run(model: nn.Module, rows: int, tokens: int) -> tuple[int, int]:
    """(highest, still held) bytes of a no-gradient forward over `rows` x `tokens` that keeps
    its KV cache and the last position's logits, as generate's prefill runs."""
    tracker = activations._LiveBytes(model)
    ids = torch.zeros(rows, tokens, dtype=torch.long, device="meta")
    with torch.no_grad(), tracker:
        output = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        held = tracker.running
    del output
    return max(tracker.live.values(), default=0), held


def follow_generation(
    model: nn.Module, layers: int, batch_size: int, prompt: int, generated: int, vocab: int
) -> Generation:
    """The rollouts of `batch_size` rows: a `prompt`-token prefill, then `generated` tokens."""
    model.eval()
    try:
        prefill, _ = _cache_run(model, batch_size, prompt)
        _, two = _cache_run(model, 1, 2)
        _, four = _cache_run(model, 1, 4)
    finally:
        model.train()
    per_position = (four - two) // 2  # one row's keys and values, every layer, one position
    cache = per_position * batch_size * (prompt + generated)
    one_layer_keys = cache // max(2 * layers, 1)
    decode = one_layer_keys + SAMPLING_COPIES * batch_size * vocab * 4
    return Generation(prefill, cache, decode)
