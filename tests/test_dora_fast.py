"""DoRA with dropout on the fast path (methods/lora/dora.py) against PEFT's own DoRA layers given
the very same dropout masks: equal logits and gradients within 1e-5 over two training steps, the
weight norm computed once per layer per step (a gradient-checkpointed recompute reuses it), and
PEFT's forward kept under autocast."""

import copy

import peft
import pytest
import torch
from torch import nn

import peftkit
from contract import batch_for, tiny
from peftkit.methods import lora
from peftkit.methods.lora import down as lora_fast_down
from peftkit.methods.lora import fast as lora_fast

P = 0.25  # a multiple of 1/65536: the fast path's mask keeps exactly this probability
TOLERANCE = 1e-5


class _Masks:
    """The i-th mask asked for, the same in both models: seeded by its call number."""

    def __init__(self) -> None:
        self.calls = 0

    def next(self, shape: torch.Size) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1000 + self.calls)
        self.calls += 1
        return torch.rand(shape.numel(), generator=generator).ge(P).view(shape)


class _InjectedDropout(nn.Dropout):
    """nn.Dropout (PEFT checks for one) whose mask comes from _Masks, as PEFT's dropout applies
    it: x * mask / (1 - p)."""

    def __init__(self, masks: _Masks) -> None:
        super().__init__(P)
        self.masks = masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.masks.next(x.reshape(-1, x.shape[-1]).shape).view(x.shape)
        return x * keep / (1 - P)


def _pair(masks: _Masks, monkeypatch, dtype=torch.float32):
    """peftkit's DoRA model and PEFT's own on one base, equal non-trivial weights (B non-zero,
    magnitudes off the initial norms); PEFT's dropout and the fast path's draw take the masks."""
    base, tokenizer = tiny("llama")
    base = base.to(dtype)
    config = peftkit.DoraConfig(rank=4, dropout=P, target_modules="all-linear")
    fast = peftkit.apply(copy.deepcopy(base), config)
    reference = peft.get_peft_model(base, lora.peft_config(base, config))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for (name, mine), (_, theirs) in zip(
            fast.named_parameters(), reference.named_parameters(), strict=True
        ):
            if "lora_B" in name:
                theirs.normal_(std=0.3, generator=generator)
            if "lora_magnitude_vector" in name:
                theirs.mul_(1 + 0.2 * torch.randn(theirs.shape, generator=generator))
            mine.copy_(theirs)
    for module in reference.modules():
        if isinstance(module, peft.tuners.lora.Linear):
            module.lora_dropout["default"] = _InjectedDropout(masks)
    monkeypatch.setattr(lora_fast_down, "keep_mask", lambda shape, p, device: masks.next(shape))
    return fast, reference, batch_for("llama", tokenizer)


def _step(model, batch, masks: _Masks):
    """Logits and trainable gradients of one training forward and backward (masks from 0)."""
    masks.calls = 0
    model.train()
    model.zero_grad(set_to_none=True)
    output = model(**batch)
    output.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return output.logits.detach(), grads, masks.calls


def _assert_equal(got, want, tolerance: float = TOLERANCE) -> None:
    torch.testing.assert_close(got[0], want[0], atol=tolerance, rtol=0)
    assert got[1].keys() == want[1].keys()
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, atol=tolerance, rtol=0, msg=name)


@pytest.mark.parametrize(
    ("dtype", "steps", "tolerance"), [(torch.float32, 1, TOLERANCE), (torch.float64, 2, 1e-10)]
)
def test_dora_dropout_matches_peft(monkeypatch, dtype, steps, tolerance):
    """Every layer on the fast path (PEFT's forward never runs for peftkit's model); logits and
    gradients as PEFT's with the same masks: within 1e-5 in float32 (PEFT's own float32 logits
    differ from its float64 ones by about that on this tiny model, whose random weights amplify
    rounding), and to rounding in float64 also after an optimizer step changed A, B and the
    magnitudes (so the cached norm must be recomputed)."""
    masks = _Masks()
    fast, reference, batch = _pair(masks, monkeypatch, dtype)
    peft_calls = []
    original = peft.tuners.lora.Linear.forward
    monkeypatch.setattr(
        peft.tuners.lora.Linear,
        "forward",
        lambda self, *a, **k: peft_calls.append(self) or original(self, *a, **k),
    )
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05)
                  for m in (fast, reference)]  # fmt: skip
    for _ in range(steps):
        want = _step(reference, batch, masks)
        peft_calls.clear()
        got = _step(fast, batch, masks)
        assert not peft_calls
        assert got[2] == want[2] == 14  # one mask per layer, in the same order
        _assert_equal(got, want, tolerance)
        for optimizer in optimizers:
            optimizer.step()
    assert any("lora_magnitude_vector" in name and g.abs().sum() > 0 for name, g in got[1].items())


def test_norm_once_per_layer_per_step(monkeypatch):
    """With gradient checkpointing the forward runs twice a step; the norm is computed once per
    layer until an optimizer step changes the adapter, and the logits stay PEFT's."""
    masks = _Masks()
    fast, reference, batch = _pair(masks, monkeypatch)
    fast.gradient_checkpointing_enable({"use_reentrant": False})
    norms = []
    original = torch.linalg.norm
    monkeypatch.setattr(torch.linalg, "norm", lambda *a, **k: norms.append(1) or original(*a, **k))
    optimizer = torch.optim.SGD([p for p in fast.parameters() if p.requires_grad], lr=0.05)
    with torch.random.fork_rng():
        assert _step(fast, batch, masks)[2] == 28  # 14 layers' masks, twice: recomputed
        assert len(norms) == 14
        _step(fast, batch, masks)
        assert len(norms) == 14  # nothing changed: every norm reused
        optimizer.step()
        _step(fast, batch, masks)
        assert len(norms) == 28
    monkeypatch.setattr(torch.linalg, "norm", original)
    with torch.no_grad():  # PEFT's model with the adapter after the step
        for mine, theirs in zip(fast.parameters(), reference.parameters(), strict=True):
            theirs.copy_(mine)
    want = _step(reference, batch, masks)
    got = _step(fast, batch, masks)
    torch.testing.assert_close(got[0], want[0], atol=TOLERANCE, rtol=0)


def test_autocast_and_training_base_keep_peft_forward():
    """DoRA with dropout under autocast (its casts) or with the base weight training (the fast
    function gives the base no gradient): PEFT's own forward."""
    base, _ = tiny("llama")
    model = peftkit.apply(base, peftkit.DoraConfig(rank=4, dropout=P, target_modules="all-linear"))
    layer = next(m for m in model.modules() if isinstance(m, peft.tuners.lora.Linear))
    layer.train()
    x = torch.randn(2, 3, layer.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lora_fast.fast_adapter(layer, x, (), {}) is None
    assert lora_fast.fast_adapter(layer, x, (), {}) == "default"
    layer.base_layer.weight.requires_grad_(True)  # a training base weight: PEFT's too
    assert lora_fast.fast_adapter(layer, x, (), {}) is None


@pytest.mark.parametrize("bias", [False, True])
def test_function_against_closed_form(bias):
    """DoraDropped's gradients (input, A, B, magnitude, bias) against autograd through PEFT's
    expression, in float64."""
    from peftkit.methods.lora.dora import DoraDropped

    generator = torch.Generator().manual_seed(4)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()

    x, w, a, b, m = leaf(6, 5), leaf(7, 5).detach(), leaf(3, 5), leaf(7, 3), leaf(7)
    bias_t = leaf(7) if bias else None  # the base weight is frozen, a bias may train (BitFit)
    keep = torch.rand(6, 5, generator=generator).ge(P)
    norm = torch.linalg.norm(w.detach() + 2.0 * b.detach() @ a.detach(), dim=1)
    dropped = x * keep / (1 - P)
    r = m / norm
    base = x @ w.t() + (bias_t if bias else 0)
    want = base + (r - 1) * (dropped @ w.t()) + r * (dropped @ a.t() @ b.t()) * 2.0
    inputs = [t for t in (x, bias_t, a, b, m) if t is not None]
    upstream = torch.randn(6, 7, generator=generator, dtype=torch.float64)
    want_grads = torch.autograd.grad(want, inputs, upstream)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lora_fast_down, "keep_mask", lambda shape, p, device: keep)
        got = DoraDropped.apply(x, P, w, bias_t, a, b, m, norm, 2.0)
    got_grads = torch.autograd.grad(got, inputs, upstream)
    torch.testing.assert_close(got, want)
    for mine, theirs in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(mine, theirs)
