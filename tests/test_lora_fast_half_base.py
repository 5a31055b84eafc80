"""The fast LoRA path on a bf16 base: the float32 adapter weights are cast to bf16 for the branch
(PEFT casts each layer's input up to float32 instead). Held to float32 PEFT as the exact answer:
no less accurate than PEFT's own bf16-base forward, the masters stay float32 and get gradients,
and less is saved for backward."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import peftkit
from contract import batch_for, tiny
from peftkit.methods import lora
from peftkit.methods.lora import fast as lora_fast

CONFIG = peftkit.LoraConfig(rank=4, dropout=0.0, target_modules="all-linear")


def _models():
    """A float32 PEFT reference, PEFT's own LoRA on a bf16 base, and peftkit's on a bf16 base,
    all with the same non-zero adapter weights."""
    base, tokenizer = tiny("llama")
    exact = peft.get_peft_model(copy.deepcopy(base), lora.peft_config(base, CONFIG))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in exact.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.3)
    half = copy.deepcopy(base).to(torch.bfloat16)
    theirs = peft.get_peft_model(copy.deepcopy(half), lora.peft_config(half, CONFIG))
    mine = peftkit.apply(copy.deepcopy(half), CONFIG)
    for model in (theirs, mine):
        with torch.no_grad():
            for (_, parameter), (_, value) in zip(
                model.named_parameters(), exact.named_parameters(), strict=True
            ):
                if parameter.requires_grad:
                    parameter.copy_(value)
    return exact, theirs, mine, batch_for("llama", tokenizer)


def _step(model, batch):
    model.train()
    model.zero_grad()
    output = model(**batch)
    output.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return output.logits.detach().float(), grads


def _relative_error(got, want):
    return ((got.float() - want).norm() / want.norm()).item()


def _peft_forward_calls(model, batch, monkeypatch):
    calls = []
    original = peft.tuners.lora.Linear.forward
    monkeypatch.setattr(
        peft.tuners.lora.Linear, "forward", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    model(**batch)
    return len(calls)


def test_bf16_base_takes_the_fast_path_no_less_accurately_than_peft(monkeypatch):
    exact, theirs, mine, batch = _models()
    want = _step(exact, batch)
    peft_result = _step(theirs, batch)
    for _ in range(2):  # the first forward finds the siblings, the second shares
        got = _step(mine, batch)
        assert _relative_error(got[0], want[0]) <= 1.5 * _relative_error(peft_result[0], want[0])
        for name, grad in got[1].items():
            assert grad.dtype == torch.float32, name  # float32 masters, float32 gradients
            error = _relative_error(grad, want[1][name])
            assert error <= 1.5 * _relative_error(peft_result[1][name], want[1][name]) + 1e-2
    assert _peft_forward_calls(mine, batch, monkeypatch) == 0
    assert all(p.dtype == torch.float32 for p in mine.parameters() if p.requires_grad)


def test_bf16_base_keeps_no_float32_copy_of_any_layer_input():
    _, theirs, mine, batch = _models()
    tokens = batch["input_ids"].numel()

    def float32_inputs_saved(model):
        """Saved float32 tensors holding one row per token of a layer input (width 32 or 64)."""
        found = {}

        def pack(tensor):
            if (
                tensor.dtype == torch.float32
                and tensor.dim() > 0
                and tensor.shape[-1] in (32, 64)
                and tensor.numel() == tokens * tensor.shape[-1]
            ):
                found[tensor.untyped_storage().data_ptr()] = tensor.shape
            return tensor

        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**batch)
        return len(found)

    mine.train()
    mine(**batch)  # find the siblings
    # PEFT: a float32 copy of the input of each of the 7 adapted layers, in each of 2 layers; the
    # rest (RMSNorm computes in float32) both keep.
    assert float32_inputs_saved(theirs) - float32_inputs_saved(mine) == 7 * 2


@pytest.mark.parametrize(("dtype", "kind"), [("fp32", "nf4"), ("bf16", "nf4"), ("fp32", "int8")])
def test_quantized_base_takes_the_fast_path_and_equals_peft(dtype, kind, monkeypatch):
    """On an NF4 or LLM.int8 base the base output is bitsandbytes' own, the branch float32 from the
    same input as PEFT's: logits and every gradient agree with PEFT's bnb LoRA layers."""
    config = peftkit.LoraConfig(rank=4, dropout=0.0, target_modules="all-linear")
    base, tokenizer = tiny("llama", dtype=dtype, quantize=kind)
    batch = batch_for("llama", tokenizer)
    theirs = peft.get_peft_model(copy.deepcopy(base), lora.peft_config(base, config))
    mine = peftkit.apply(copy.deepcopy(base), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for (name, parameter), (_, value) in zip(
            mine.named_parameters(), theirs.named_parameters(), strict=True
        ):
            if "lora_B" in name:
                value.normal_(std=0.3)
            if parameter.requires_grad:
                parameter.copy_(value)
    want = _step(theirs, batch)
    for _ in range(2):  # the first forward finds the siblings, the second shares
        got = _step(mine, batch)
        if dtype == "fp32":
            torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
            for name, grad in got[1].items():
                torch.testing.assert_close(grad, want[1][name], atol=1e-5, rtol=1e-4)
        else:
            # bf16 activations: PEFT rounds each sibling's input gradient to bf16 before summing
            # them, the fast path sums in float32 and rounds once; the two differ by bf16's
            # rounding (2^-8 = 0.4% an element), so whole tensors agree to about 1%.
            assert _relative_error(got[0], want[0]) < 1e-2
            for name, grad in got[1].items():
                assert _relative_error(grad, want[1][name]) < 2e-2, name
    calls = []
    for cls in lora_fast.QUANTIZED_LORA:
        original = cls.forward
        monkeypatch.setattr(
            cls, "forward", lambda *a, _f=original, **k: calls.append(1) or _f(*a, **k)
        )
    mine(**batch)
    assert not calls  # PEFT's bnb forward never ran
