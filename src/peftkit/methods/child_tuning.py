"""Child-Tuning (Xu et al., EMNLP 2021): update only a child network of the model's weights.

Mode F (task-free): all weights train, but each optimizer step keeps a fresh Bernoulli(p) share of
every gradient, scaled by 1/p. Entries outside that step's mask do not move: neither Adam's
momentum nor decoupled weight decay moves them (the reference optimizer lets both move them).
With plain AdamW the optimizer is replaced by ChildTuningAdamW (child_tuning_adamw.py), which
masks in its own update in one pass; around any other optimizer the hooks mask the gradients
before its step and restore the entries outside the mask after it.

Mode D (task-driven): before training, the Fisher information (mean squared gradient over task
batches) ranks every weight of the transformer layers; the top p fraction is the child network,
fixed for the whole run. Unlike the reference code, which keeps full Adam state, each weight keeps
its chosen entries as a trainable 1-D `values` tensor with fixed `indices`, folded in by a
parametrization; the dense weight stays frozen, so optimizer state scales with p.

Both save a sparse patch: for each changed tensor, the indices of its changed entries and their
new values (new values, not differences, so loading reproduces the tuned weights bit for bit)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from peftkit.config import to_dict
from peftkit.errors import AdapterError, ConfigError, DataError
from peftkit.method import Method, TrainingHooks
from peftkit.targeting import task_head_modules

MODES = ("D", "F")
_STATE = "_peftkit_child_tuning"
# A numbered path segment ("layers.3.", "h.0.", "block.1.") marks the repeated transformer layers:
# the reference code's D mask covers the parameters whose name contains "layer".
_IN_LAYER_STACK = re.compile(r"\.\d+\.")


@dataclass(frozen=True)
class ChildTuningConfig:
    """Update only a child network: a random one each step (F) or a Fisher-chosen one (D)."""

    mode: str = field(
        default="D",
        metadata={"help": "'D' (task-driven: Fisher-chosen fixed subnetwork) or 'F' (task-free)"},
    )
    reserve_ratio: float = field(
        default=0.3,
        metadata={"help": "p: share of weights updated (F: per step, D: the fixed subnetwork)"},
    )
    fisher_batches: int | None = field(
        default=None,
        metadata={"help": "D: task batches in the Fisher pass (default: every batch given)"},
    )
    saved_layout: dict[str, int] | None = field(
        default=None,
        metadata={
            "help": "written by save: changed entries per tensor, so load can build the right "
            "shapes; leave unset when training"
        },
    )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"Child-Tuning mode must be 'D' or 'F', got {self.mode!r}.")
        if not 0.0 < self.reserve_ratio <= 1.0:
            raise ConfigError(
                f"reserve_ratio must be in (0, 1] (the paper uses 0.3), got {self.reserve_ratio}."
            )
        if self.fisher_batches is not None and self.fisher_batches < 1:
            raise ConfigError(
                f"fisher_batches must be at least 1 (or unset for all), got {self.fisher_batches}."
            )


@dataclass
class ChildState:
    """What apply leaves on the model: config, and the per-mode bookkeeping."""

    config: ChildTuningConfig
    original_requires_grad: dict[str, bool]
    # D: parameter name -> (owning module, attribute) of each patched tensor.
    patched: dict[str, tuple[nn.Module, str]] = field(default_factory=dict)
    # F: entries ever updated, this step's masks, pre-step copies to restore from, the names
    # masked this step (all reused every step).
    touched: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    before_step: dict[str, torch.Tensor] = field(default_factory=dict)
    masked_now: list[str] = field(default_factory=list)
    # F: tensors changed in so many entries that they are saved whole (no longer tracked).
    saved_dense: set[str] = field(default_factory=set)
    # F: chunk-sized work buffers by (dtype, device, slot), reused every step (see _CHUNK).
    buffers: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict)
    # F while loading: the saved layout, until load_state_dict writes the patch.
    pending: dict[str, int] = field(default_factory=dict)
    # F: the optimizer draws and applies the masks itself (ChildTuningAdamW); the hooks stand by.
    fused: bool = False
    # F, compiled step: entries in each touched mask, kept up to date as they are set.
    touched_count: dict[str, int] = field(default_factory=dict)


class SparsePatch(nn.Module):
    """Parametrization: the frozen weight with the entries at `indices` replaced by `values`."""

    def __init__(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("indices", indices)
        self.values = nn.Parameter(values)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """W with the kept entries swapped in; the gradient flows to `values` only."""
        return weight.flatten().index_put((self.indices,), self.values).view_as(weight)


def _state(model: nn.Module) -> ChildState:
    """The Child-Tuning state apply left on the model."""
    state = getattr(model, _STATE, None)
    if state is None:
        raise ConfigError("This model has no Child-Tuning applied: call peftkit.apply first.")
    return state


def index_dtype(numel: int) -> torch.dtype:
    """int32 indices where they fit (half the bytes of int64)."""
    return torch.int32 if numel < 2**31 else torch.int64


def layer_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of the numbered transformer layers: D's candidates."""
    return {n: p for n, p in model.named_parameters() if _IN_LAYER_STACK.search(f".{n}")}


def apply(model: nn.Module, config: ChildTuningConfig) -> nn.Module:
    """F: every weight trains (masked per step). D: freeze all but the task head until prepare
    chooses the subnetwork (or, when loading, build the saved layout's shapes)."""
    state = ChildState(config, {n: p.requires_grad for n, p in model.named_parameters()})
    object.__setattr__(model, _STATE, state)
    if config.mode == "F":
        model.requires_grad_(True)
        state.pending = dict(config.saved_layout or {})
        return model
    model.requires_grad_(False)
    for name in task_head_modules(model):
        model.get_submodule(name).requires_grad_(True)
    parameters = dict(model.named_parameters())
    saved = config.saved_layout or {}
    for name in saved:
        if name not in parameters:
            raise AdapterError(f"The saved Child-Tuning layout names '{name}', not in this model.")
    # Patch in the model's parameter order, as prepare does (the saved layout is sorted by name):
    # a resumed optimizer matches its saved state to the parameters by position.
    for name in (name for name in parameters if name in saved):
        placeholder = torch.zeros(saved[name], dtype=index_dtype(parameters[name].numel()))
        _install_patch(model, state, name, placeholder)
    return model


def _install_patch(model: nn.Module, state: ChildState, name: str, indices: torch.Tensor) -> None:
    """Fold a trainable values tensor for `indices` into parameter `name`; the dense one freezes."""
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    weight = getattr(module, attribute)
    weight.requires_grad_(False)
    indices = indices.to(weight.device)
    values = weight.detach().flatten()[indices.long()].clone()
    parametrize.register_parametrization(module, attribute, SparsePatch(indices, values))
    state.patched[name] = (module, attribute)


def _on_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a batch's tensors to the model's device."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def fisher_information(
    model: nn.Module,
    parameters: dict[str, nn.Parameter],
    batches: Iterable[dict[str, Any]],
    max_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """Mean squared gradient of the task loss per entry (float32), over up to max_batches."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.requires_grad_(False)
    for parameter in parameters.values():
        parameter.requires_grad_(True)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in parameters.items()}
    device = next(model.parameters()).device
    count = 0
    model.train()  # as the reference code: dropout on, like the training it prepares
    try:
        for batch in batches:
            if max_batches is not None and count >= max_batches:
                break
            loss = model(**_on_device(batch, device)).loss
            if loss is None:
                raise DataError("The Fisher pass needs batches with labels (the loss was None).")
            loss.backward()
            for name, parameter in parameters.items():
                if parameter.grad is not None:
                    fisher[name].addcmul_(parameter.grad, parameter.grad)
                    parameter.grad = None
            count += 1
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(flags[name])
            parameter.grad = None
        model.train(was_training)
    if count == 0:
        raise DataError(
            "Child-Tuning D's Fisher pass received no batches: pass the training batches "
            "(an iterable of dicts model(**batch) accepts, labels included) to prepare()."
        )
    return {n: f.div_(count) for n, f in fisher.items()}


# Radix digits of a non-negative float32's 31 significant bits, high to low: (shift, width).
_DIGITS = ((23, 8), (15, 8), (7, 8), (0, 7))


def kth_largest_bits(bits: dict[str, torch.Tensor], k: int) -> tuple[int, int]:
    """The bit pattern t of the k-th largest entry over all tensors, and how many entries equal
    to t belong to the top k. A radix select: one bincount pass per 8-bit digit, no concat."""
    prefix, wanted, decided = 0, k, 0  # decided: bits of t fixed so far
    for shift, width in _DIGITS:
        counts = torch.zeros(1 << width, dtype=torch.int64)
        for pattern in bits.values():
            flat = pattern.flatten()
            if decided:  # only entries whose higher digits equal t's so far can still matter
                flat = flat[(flat >> (shift + width)) == prefix]
            digits = (flat >> shift) & ((1 << width) - 1)
            counts += torch.bincount(digits, minlength=1 << width)
        from_top = counts.flip(0).cumsum(0)
        position = int((from_top >= wanted).nonzero()[0])
        digit = (1 << width) - 1 - position
        wanted -= int(from_top[position] - counts[digit])  # higher digits are all in the top k
        prefix, decided = (prefix << width) | digit, decided + width
    return prefix, wanted


def top_k_masks(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Exactly the k largest entries over all tensors, without concatenating them.

    Non-negative float32 values order like their int32 bit patterns, so a radix select over
    the bit patterns (kth_largest_bits) finds the k-th largest value exactly. Ties at that value
    are broken by position (earlier tensors, then earlier entries), so exactly k are kept."""
    bits = {n: s.contiguous().view(torch.int32) for n, s in scores.items()}
    threshold, ties_wanted = kth_largest_bits(bits, k)
    masks = {n: b > threshold for n, b in bits.items()}
    for name, pattern in bits.items():
        if ties_wanted <= 0:
            break
        ties = (pattern == threshold).flatten().nonzero().squeeze(1)[:ties_wanted]
        masks[name].view(-1)[ties] = True
        ties_wanted -= ties.numel()
    return masks


def choose_subnetwork(model: nn.Module, batches: Iterable[dict[str, Any]]) -> None:
    """D's prepare hook: Fisher pass, keep the top p of the layers' weights, patch them in.
    A model that already has its subnetwork (loaded from an adapter, or resumed) keeps it."""
    state = _state(model)
    if state.patched:
        return
    candidates = layer_parameters(model)
    fisher = fisher_information(model, candidates, batches, state.config.fisher_batches)
    total = sum(f.numel() for f in fisher.values())
    keep = max(1, round(state.config.reserve_ratio * total))
    masks = top_k_masks(fisher, keep)
    del fisher
    for name, mask in masks.items():
        indices = mask.flatten().nonzero().squeeze(1)
        if indices.numel():
            _install_patch(model, state, name, indices.to(index_dtype(mask.numel())))


_LANES = 65536  # Bernoulli draws from 16 random bits each: p is used in steps of 1/65536


def bernoulli_mask(
    shape: torch.Size,
    ratio: float,
    device: torch.device,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """A Bernoulli(ratio) bool mask from 16 random bits per entry (four per int64 draw, about
    twice as fast as torch.rand on CPU); ratio is rounded to a multiple of 1/65536. `out` and
    `scratch` (an int64 buffer) are reused when given: no fresh pages to fault in every step."""
    numel = shape.numel()
    words_needed = (numel + 3) // 4
    if scratch is None or scratch.numel() < words_needed or scratch.device != device:
        scratch = torch.empty(words_needed, dtype=torch.int64, device=device)
    lanes = scratch[:words_needed].random_(-(2**63), 2**63 - 1).view(torch.int16)[:numel]
    if out is None:
        return (lanes < lane_threshold(ratio)).view(shape)
    torch.lt(lanes, lane_threshold(ratio), out=out.view(-1))
    return out


def lane_threshold(ratio: float) -> int:
    """The int16 bound below which a uniform 16-bit lane counts as kept."""
    return max(1, round(ratio * _LANES)) - _LANES // 2


def effective_ratio(ratio: float) -> float:
    """The keep probability bernoulli_mask really uses (the 1/p scale uses it, so the expected
    gradient is exactly the true one)."""
    return (lane_threshold(ratio) + _LANES // 2) / _LANES


# F works through each tensor in chunks of this many entries: its random bits, mask, scale factor
# and restore masks then stay in the CPU's cache between the passes over a chunk. Over whole
# tensors the same operations ran at about half this speed (mixed bool/float kernels read memory
# several times); measured on 28M entries, one thread: 368 ms -> 204 ms a step.
_CHUNK = 1 << 18
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _buffer(state: ChildState, dtype: torch.dtype, device: torch.device, slot: int) -> torch.Tensor:
    """A reusable chunk-sized work tensor."""
    key = (dtype, device, slot)
    if key not in state.buffers:
        state.buffers[key] = torch.empty(_CHUNK, dtype=dtype, device=device)
    return state.buffers[key]


def _chunks(numel: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of each chunk of a flat tensor of `numel` entries."""
    for start in range(0, numel, _CHUNK):
        yield start, min(start + _CHUNK, numel)


def mask_gradients(model: nn.Module, step: int) -> None:
    """F, before the optimizer step: keep a fresh Bernoulli(p) share of each gradient, times 1/p,
    and remember the weights so entries outside the mask can be restored after the step."""
    state = _state(model)
    if state.fused:
        return
    ratio = state.config.reserve_ratio
    if ratio == 1.0:  # every entry kept: plain fine-tuning, everything with a gradient changes
        for name, parameter in model.named_parameters():
            if parameter.grad is not None and name not in state.touched:
                state.touched[name] = torch.ones_like(parameter, dtype=torch.bool)
        return
    scale = 1.0 / effective_ratio(ratio)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.grad is None:
                continue
            if not parameter.grad.is_contiguous():
                parameter.grad = parameter.grad.contiguous()
            if name not in state.masks:  # buffers reused every step
                state.masks[name] = torch.empty_like(parameter, dtype=torch.bool)
                state.before_step[name] = torch.empty_like(parameter)
            keep, grad = state.masks[name].view(-1), parameter.grad.view(-1)
            weight, before = parameter.detach().view(-1), state.before_step[name].view(-1)
            bits = _buffer(state, torch.int64, grad.device, 0)  # random bits: 4 lanes a word
            factor = _buffer(state, grad.dtype, grad.device, 1)
            for start, stop in _chunks(grad.numel()):
                size = stop - start
                bernoulli_mask(torch.Size([size]), ratio, grad.device, keep[start:stop], bits)
                # A float factor (0 or 1/p): float x bool multiplies run far slower.
                chunk_factor = factor[:size]
                chunk_factor.copy_(keep[start:stop]).mul_(scale)
                grad[start:stop].mul_(chunk_factor)
                before[start:stop].copy_(weight[start:stop])
            state.masked_now.append(name)


def restore_outside_mask(model: nn.Module, step: int) -> None:
    """F, after the optimizer step: put back every entry outside this step's mask exactly (bit for
    bit: the weights are combined as integers, kept bits from the new value, the rest from the
    old one)."""
    state = _state(model)
    if state.fused:
        return
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name in state.masked_now:
            keep, parameter = state.masks[name], parameters[name].detach()
            as_int = _SAME_SIZE_INT[parameter.element_size()]
            weight = parameter.view(-1).view(as_int)
            before = state.before_step[name].view(-1).view(as_int)
            flat_keep = keep.view(-1)
            kept_buffer = _buffer(state, as_int, parameter.device, 2)
            other_buffer = _buffer(state, as_int, parameter.device, 3)
            for start, stop in _chunks(weight.numel()):
                kept_bits = kept_buffer[: stop - start]
                kept_bits.copy_(flat_keep[start:stop]).neg_()  # all bits set where kept, else 0
                other_bits = torch.bitwise_not(kept_bits, out=other_buffer[: stop - start])
                chunk = weight[start:stop]
                chunk.bitwise_and_(kept_bits).bitwise_or_(
                    before[start:stop].bitwise_and_(other_bits)
                )
            if name in state.saved_dense:
                continue
            if name not in state.touched:
                state.touched[name] = torch.zeros_like(keep)
            state.touched[name] |= keep
            stop_tracking_if_dense(state, name)
    state.masked_now.clear()


def stop_tracking_if_dense(state: ChildState, name: str, count: int | None = None) -> None:
    """Each F step touches a fresh p share, so within about ten steps (p = 0.3) a tensor has
    changed in so many entries that it will be saved whole; from then on tracking it costs a pass
    over its size every step for nothing, so an all-True view replaces it. count: the entries
    touched, when known (else counted here)."""
    touched = state.touched[name]
    count = int(touched.sum()) if count is None else count
    if patch_bytes(count, touched.numel()) >= 4 * touched.numel():
        all_true = torch.ones(1, dtype=torch.bool, device=touched.device)
        state.touched[name] = all_true.expand(touched.shape)
        state.saved_dense.add(name)


def hooks(model: nn.Module, config: ChildTuningConfig) -> TrainingHooks:
    """D chooses its subnetwork in prepare; F masks in its own AdamW step where the optimizer is
    plain AdamW (one pass over memory), else around the optimizer's step."""
    if config.mode == "D":
        return TrainingHooks(prepare=choose_subnetwork)
    from peftkit.methods.child_tuning_adamw import replace_optimizer

    return TrainingHooks(
        before_optimizer_step=mask_gradients,
        after_optimizer_step=restore_outside_mask,
        replace_optimizer=replace_optimizer,
    )


def layout(model: nn.Module) -> dict[str, int]:
    """Changed entries per tensor (a tensor's full size means it is saved dense)."""
    state = _state(model)
    if state.pending:
        return dict(state.pending)
    if state.config.mode == "D":
        return {
            name: module.parametrizations[attribute][0].values.numel()
            for name, (module, attribute) in state.patched.items()
        }
    found = {}
    for name, touched in state.touched.items():
        count, numel = int(touched.sum()), touched.numel()
        if count:
            # F changes more of each tensor every step; once a sparse patch would be no smaller
            # than the tensor itself, the whole tensor is saved (a count equal to its size).
            found[name] = numel if patch_bytes(count, numel) >= 4 * numel else count
    return found


def encoding(count: int, numel: int) -> str:
    """How a tensor with `count` changed entries of `numel` is stored: 'dense' (the tensor),
    'indices' (int32 positions) or 'bitmask' (1 bit per entry), whichever is smallest."""
    if count == numel:
        return "dense"
    return "bitmask" if count * 4 > (numel + 7) // 8 else "indices"


def patch_bytes(count: int, numel: int) -> int:
    """Bytes on disk of a sparse patch of float32 values (for choosing dense instead)."""
    return count * 4 + min(count * 4, (numel + 7) // 8)


_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A flat bool mask as uint8 bytes, 8 entries per byte (little-endian bit order)."""
    flat = mask.flatten()
    padded = torch.zeros((flat.numel() + 7) // 8 * 8, dtype=torch.uint8)
    padded[: flat.numel()] = flat
    return (padded.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The flat bool mask pack_bits encoded."""
    bits = packed.view(-1, 1).bitwise_and(_BIT_WEIGHTS) != 0
    return bits.flatten()[:numel]


def _dense_trainables(model: nn.Module) -> dict[str, torch.Tensor]:
    """D: the densely trained tensors (the task head), under their own names."""
    return {
        n: p.detach()
        for n, p in model.named_parameters()
        if p.requires_grad and ".parametrizations." not in n
    }


def _patch_of(model: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) of a changed tensor, whichever mode changed it."""
    state = _state(model)
    if name in state.patched:
        module, attribute = state.patched[name]
        patch = module.parametrizations[attribute][0]
        return patch.indices, patch.values.detach()
    parameter = dict(model.named_parameters())[name]
    if name in state.pending:  # loading: shapes only, filled by load_state_dict
        size = state.pending[name]
        return torch.empty(size, dtype=index_dtype(parameter.numel())), torch.empty(size)
    indices = state.touched[name].flatten().nonzero().squeeze(1)
    return indices.to(index_dtype(parameter.numel())), parameter.detach().flatten()[indices]


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The sparse patch per changed tensor: '<name>.values' with '<name>.indices' or a packed
    '<name>.bitmask' (whichever is smaller), or '<name>' itself where nearly all of it changed;
    plus D's dense task head."""
    state = _state(model)
    tensors = _dense_trainables(model) if state.config.mode == "D" else {}
    for name, count in layout(model).items():
        numel = _numel(model, name)
        kind = encoding(count, numel)
        if kind == "dense":
            tensors[name] = _current(model, name).detach()  # the tensor as it now is
            continue
        indices, tensors[f"{name}.values"] = _patch_of(model, name)
        if kind == "indices":
            tensors[f"{name}.indices"] = indices
        elif name in _state(model).pending:  # loading: shapes only
            tensors[f"{name}.bitmask"] = torch.empty((numel + 7) // 8, dtype=torch.uint8)
        else:
            mask = torch.zeros(numel, dtype=torch.bool)
            mask[indices.long()] = True
            tensors[f"{name}.bitmask"] = pack_bits(mask)
    return tensors


def _current(model: nn.Module, name: str) -> torch.Tensor:
    """A tensor by its original name, as the model now computes it (patch included)."""
    module_name, _, attribute = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attribute)


def _numel(model: nn.Module, name: str) -> int:
    """The number of entries of a (possibly patched) tensor by its original name."""
    return _current(model, name).numel()


def load_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Write a saved patch: D into its values tensors, F into the weights themselves."""
    state = _state(model)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, count in layout(model).items():
            numel = _numel(model, name)
            kind = encoding(count, numel)
            if kind == "dense":
                values, indices = tensors[name].flatten(), torch.arange(numel)
            elif kind == "indices":
                indices, values = tensors[f"{name}.indices"].long(), tensors[f"{name}.values"]
            else:
                mask = unpack_bits(tensors[f"{name}.bitmask"], numel)
                indices, values = mask.nonzero().squeeze(1), tensors[f"{name}.values"]
            if name in state.patched:
                module, attribute = state.patched[name]
                patch = module.parametrizations[attribute][0]
                patch.indices.copy_(indices)
                patch.values.copy_(values)
            else:
                parameters[name].view(-1)[indices] = values.to(parameters[name].dtype)
                touched = torch.zeros(parameters[name].shape, dtype=torch.bool)
                touched.view(-1)[indices] = True
                state.touched[name] = touched
                state.touched_count.pop(name, None)  # recounted from the new mask when needed
        for name in _dense_trainables(model) if state.config.mode == "D" else {}:
            parameters[name].copy_(tensors[name])
    state.pending.clear()


def adapter_config(model: nn.Module, config: ChildTuningConfig) -> dict[str, Any]:
    """adapter_config.json: the config plus the layout load needs to rebuild the shapes."""
    saved = to_dict(config)
    saved["saved_layout"] = layout(model)
    return {"peftkit_method": "child_tuning", **saved}


def merge(model: nn.Module) -> nn.Module:
    """Child-Tuning changes the model's own weights: fold D's patches in, return the plain model."""
    state = _state(model)
    for module, attribute in state.patched.values():
        parametrize.remove_parametrizations(module, attribute, leave_parametrized=True)
    state.patched.clear()
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo apply: drop D's patches unapplied, restore requires_grad."""
    state = _state(model)
    for module, attribute in state.patched.values():
        parametrize.remove_parametrizations(module, attribute, leave_parametrized=False)
    state.patched.clear()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(state.original_requires_grad.get(name, True))
    return model


def planned_subnetwork(model: nn.Module, config: ChildTuningConfig) -> None:
    """D without its Fisher pass, for the memory estimator: patch in a subnetwork of the size
    prepare keeps (the top p of the layer stack's weights, max(1, round(p x their count)) entries),
    its entries spread over the tensors in proportion to their sizes. Which entries is what the
    data decides; on a meta-device model only the shapes matter. F trains every weight: nothing."""
    state = _state(model)
    if config.mode != "D" or state.patched:
        return
    sizes = {name: p.numel() for name, p in layer_parameters(model).items()}
    total = sum(sizes.values())
    if not total:
        return
    keep = max(1, round(config.reserve_ratio * total))
    counts = {name: keep * size // total for name, size in sizes.items()}
    for name in list(counts)[: keep - sum(counts.values())]:  # the rounding remainder, one each
        counts[name] += 1
    for name, count in counts.items():
        if count:
            weight = model.get_parameter(name)
            indices = torch.arange(count, dtype=index_dtype(sizes[name]), device=weight.device)
            _install_patch(model, state, name, indices)


CHILD_TUNING = Method(
    name="child_tuning",
    config_cls=ChildTuningConfig,
    apply=apply,
    state_dict=state_dict,
    load_state_dict=load_state_dict,
    hooks=hooks,
    merge=merge,
    remove=remove,
    adapter_config=adapter_config,
    description="update a child network: random per step (F) or Fisher-chosen (D)",
    prepare_without_data=planned_subnetwork,
)
