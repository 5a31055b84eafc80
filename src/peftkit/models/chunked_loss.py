"""A causal LM's head and cross-entropy computed chunk by chunk over tokens, so that the logits of
the whole batch ([batch, seq, vocab]: 4 x 512 x 49,152 floats on SmolLM2, 400 MB, and as much
again for their log-softmax and their gradient) never exist at once.

`LinearCrossEntropy` takes the hidden states of the tokens that have a label, the head's weight
(and bias) and the targets. For each chunk of rows it computes the logits, their log-sum-exp and
the loss, and, where a gradient is wanted, at once the softmax minus the one-hot target and from it
the chunk's gradients of the hidden states, the weight and the bias (as Liger-Kernel's fused
linear cross-entropy does). Backward then only scales what forward kept: the head's multiply runs
twice a step, as on the plain path, rather than three times (recomputing each chunk's logits in
backward would add one vocabulary-sized multiply per step). Only the gradients persist between
forward and backward: the hidden states' ([tokens, hidden]) and, for a trained head, the weight's.

`causal_lm_loss` runs the model with its head's forward replaced by one that keeps the hidden
states and returns a zero-stride stand-in for the logits (nothing is computed or allocated for
it), then computes transformers' causal-LM loss from them: labels shifted left by one,
ignore_index -100 ignored, the sum divided by the batch's label count when Trainer passes one
(`num_items_in_batch`), else the mean. Rows without a label are left out before the head.

`find_head` says whether a model's head can go this way, and if not why, by name: the head must be
a plain `nn.Linear` with no hooks (a head that an adapter wraps or reparametrises computes through
its own forward), its weight a plain parameter (not sharded), and the model must apply nothing to
the logits that this module does not honour: `final_logit_softcapping` (Gemma 2/3) is honoured;
`logit_scale` (Cohere) and `logits_scaling` (Granite) are not and keep the plain loss. A model
whose forward changes the logits in any other way is caught after its forward (its logits are not
the stand-in: prompt tuning's hooks cut the virtual positions off), and that step's loss is
recomputed the plain way, from the random state the step started with."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # transformers' label for a token without a loss
CHUNK_ELEMENTS = 1 << 22  # logits per chunk: 4M floats (16 MiB); 85 rows at a 49k vocabulary
# Config attributes by which a model changes its logits after the head, and this module does not
# follow (the logits would differ from the model's own).
UNHONOURED_SCALING = ("logit_scale", "logits_scaling")


def chunk_rows(vocab: int) -> int:
    """Rows per chunk so that a chunk's logits hold about CHUNK_ELEMENTS values (at least 1)."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


def _autocast(device_type: str) -> bool:
    """Whether autocast is on for a device (never on meta: the estimator's pass, no autocast)."""
    return device_type != "meta" and torch.is_autocast_enabled(device_type)


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(softcap(hidden W^T + b), target) / divisor, chunk by chunk;
    the gradients are computed in forward, chunk by chunk, and scaled in backward."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        divisor: torch.Tensor,
        softcap: float | None,
        rows: int,
    ) -> torch.Tensor:
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        any_grad = need_hidden or need_weight or need_bias
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = None  # made only where wanted: a frozen head's would be [vocab, hidden]
        if need_weight:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = None
        if need_bias:
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start : start + rows]
            target = targets[start : start + rows]
            # In the model's dtype (autocast's, under autocast), then float32, as transformers'
            # head and its loss compute them.
            logits = F.linear(h, weight, bias).float()
            capped = None
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=1)
            picked = logits.gather(1, target[:, None]).squeeze(1)
            total += (lse - picked).sum()
            if not any_grad:
                continue
            # d loss / d logits = softmax - onehot(target), in place over the logits
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(grad.shape[0], device=grad.device), target] -= 1.0
            if capped is not None:
                grad.mul_(1.0 - capped * capped)
            grad = grad.to(grad.dtype if _autocast(h.device.type) else h.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + rows] = grad.mm(weight.to(grad.dtype))
            if grad_weight is not None:
                grad_weight.addmm_(grad.t().float(), h.float())
            if grad_bias is not None:
                grad_bias += grad.float().sum(0)
        loss = total / divisor
        ctx.divisor = divisor
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_loss / ctx.divisor
        grads = [None if g is None else g * scale.to(g.dtype) for g in (grad_hidden, grad_weight)]
        grad_bias = None if grad_bias is None else grad_bias * scale
        return grads[0], grads[1], grad_bias, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    divisor: torch.Tensor | float,
    softcap: float | None = None,
    rows: int | None = None,
) -> torch.Tensor:
    """The summed cross-entropy of (hidden W^T + bias) against targets (every one a class index,
    none ignored) over `divisor`, with the logits held one chunk of rows at a time."""
    divisor = torch.as_tensor(divisor, dtype=torch.float32, device=hidden.device)
    rows = rows if rows is not None else chunk_rows(weight.shape[0])
    return LinearCrossEntropy.apply(hidden, weight, bias, targets, divisor, softcap, rows)


@dataclass
class Head:
    """A causal LM's output layer that the chunked loss can compute through."""

    module: nn.Linear
    softcap: float | None
    config: Any = None  # the config that holds final_logit_softcapping (switched off meanwhile)


def causal_lm_model(model: nn.Module) -> Any | None:
    """The transformers causal-LM model inside any wrappers (PEFT's, DDP's, peftkit's), or None."""
    from transformers import PreTrainedModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and type(module).__name__ in names:
            return module
    return None


def find_head(model: nn.Module) -> tuple[Head | None, str]:
    """The model's head for the chunked loss, or None and why not (naming what stands in the
    way)."""
    inner = causal_lm_model(model)
    if inner is None:
        return None, "the model is not a transformers causal LM"
    head = inner.get_output_embeddings()
    name = next((n for n, m in inner.named_modules() if m is head), "the output layer")
    if type(head) is not nn.Linear:
        return None, (
            f"its output layer {name} is a {type(head).__module__}.{type(head).__name__}, not a "
            "plain torch.nn.Linear (an adapter on the head computes through its own forward)"
        )
    if head._forward_hooks or head._forward_pre_hooks:
        return None, f"its output layer {name} has forward hooks"
    if type(head.weight) is not nn.Parameter:
        return None, (
            f"the weight of its output layer {name} is a {type(head.weight).__name__} (sharded "
            "or quantised), not a plain parameter"
        )
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else None
    config = config if config is not None else inner.config
    for attribute in UNHONOURED_SCALING:
        value = getattr(config, attribute, None)
        if value is not None and value != 1:
            return None, f"its config scales the logits ({attribute}={value})"
    softcap = getattr(config, "final_logit_softcapping", None)
    return Head(head, float(softcap) if softcap else None, config), ""


@contextlib.contextmanager
def hidden_states_of(head: Head) -> Iterator[dict[str, torch.Tensor]]:
    """While open, the head keeps its input under "hidden" and returns a zero-stride stand-in
    for its logits under "stand_in" (no memory, no multiply); a soft cap the loss applies
    itself is switched off in the model's config, so the model leaves the stand-in alone."""
    kept: dict[str, torch.Tensor] = {}
    module = head.module

    def capture(hidden: torch.Tensor) -> torch.Tensor:
        kept["hidden"] = hidden
        shape = (*hidden.shape[:-1], module.out_features)
        kept["stand_in"] = hidden.new_zeros(()).expand(shape)
        return kept["stand_in"]

    module.forward = capture
    if head.softcap is not None:
        head.config.final_logit_softcapping = None
    try:
        yield kept
    finally:
        module.__dict__.pop("forward", None)
        if head.softcap is not None:
            head.config.final_logit_softcapping = head.softcap


def random_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """torch's CPU (and, once used, CUDA) generator states: put back when a step's chunked
    forward is thrown away, so the plain forward draws what it would have drawn."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def restore_random_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    """Put back what random_state() read."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts: the next token's (transformers' ForCausalLMLoss shift)."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def causal_lm_loss(
    model: nn.Module,
    head: Head,
    inputs: dict[str, Any],
    num_items_in_batch: torch.Tensor | int | None,
    rows: int | None = None,
) -> torch.Tensor | None:
    """transformers' causal-LM training loss of `model` on `inputs` (holding "labels"), computed
    through the chunked head; None when the model changed its logits after the head (its forward
    ran; the caller computes the plain loss instead)."""
    labels = inputs["labels"]
    features = {key: value for key, value in inputs.items() if key != "labels"}
    with hidden_states_of(head) as kept:
        outputs = model(**features)
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    if logits is not kept.get("stand_in"):
        return None
    hidden = kept["hidden"]
    targets = shifted_labels(labels).reshape(-1).to(hidden.device)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    wanted = targets != IGNORE_INDEX
    hidden, targets = hidden[wanted], targets[wanted]
    if num_items_in_batch is None:
        divisor: Any = wanted.sum()
    elif torch.is_tensor(num_items_in_batch):
        divisor = num_items_in_batch.to(hidden.device)
    else:
        divisor = num_items_in_batch
    weight, bias = head.module.weight, head.module.bias
    return linear_cross_entropy(hidden, weight, bias, targets, divisor, head.softcap, rows)
