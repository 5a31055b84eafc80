"""A quantised base (bitsandbytes NF4 / LLM.int8 on the CPU): the same layers as transformers'
own loader makes; gradients through it equal those through its dequantised weights (also after
an evaluation pass, which must not repack the weights into bitsandbytes' forward-only CPU
format); merging a QLoRA adapter folds it into dequant(W), never into the original weights."""

from __future__ import annotations

import peft
import pytest
import torch

import peftkit
from contract import batch_for, logits, tiny
from peftkit.models import load_model
from peftkit.models.precision import base_storage
from peftkit.models.quantize import dequantize

SAVED_FAMILIES = {"llama": "causal-lm", "gpt2": "causal-lm", "t5": "seq2seq"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny models saved as checkpoints, for transformers' own quantising loader."""
    folders = {}
    for family, task in SAVED_FAMILIES.items():
        model, tokenizer = load_model(f"tiny-{family}", task)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[family] = str(folder)
    return folders


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("family", list(SAVED_FAMILIES))
def test_built_in_code_equals_transformers_loader(family, kind, saved):
    """The tiny models are quantised layer by layer in code; transformers' BitsAndBytesConfig
    loader quantises a checkpoint: the layers, their bytes and the logits must be the same."""
    task = SAVED_FAMILIES[family]
    ours, tokenizer = load_model(f"tiny-{family}", task, quantize=kind)
    theirs, _ = load_model(saved[family], task, quantize=kind)
    types = {n: type(m).__name__ for n, m in ours.named_modules()}
    assert types == {n: type(m).__name__ for n, m in theirs.named_modules()}
    assert any(name in ("Linear4bit", "Linear8bitLt") for name in types.values())
    mine, other = dict(ours.named_parameters()), dict(theirs.named_parameters())
    for name, parameter in mine.items():
        assert torch.equal(parameter.data, other[name].data), name
    batch = batch_for(family, tokenizer)
    torch.testing.assert_close(logits(ours, batch), logits(theirs, batch), atol=0, rtol=0)
    assert base_storage(ours) == kind


def _lora_grads(model, batch):  # noqa: ANN001, ANN202
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_dropout=0.0, init_lora_weights=False)
    tuned = peft.get_peft_model(model, config)
    tuned.train()
    out = tuned(**batch)
    out.loss.backward()
    grads = {n: p.grad for n, p in tuned.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_gradients_equal_those_through_the_dequantised_weights(kind):
    """The reference: the same LoRA on a plain float32 model holding dequant(W)."""
    quantized, tokenizer = tiny("llama", quantize=kind)
    batch = batch_for("llama", tokenizer)
    logits(quantized, batch)  # an evaluation pass first, as every run does
    reference, _ = tiny("llama", quantize=kind)
    dequantize(reference, torch.float32)
    assert base_storage(reference) == "fp32"
    got_logits, got = _lora_grads(quantized, batch)
    want_logits, want = _lora_grads(reference, batch)
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_qlora_merge_folds_into_the_dequantised_weights(tmp_path):
    """Merged logits equal the unmerged NF4 model's (float32 compute: only rounding differs);
    merging the same adapter into the original float32 weights would change the model."""
    model, tokenizer = tiny("llama", quantize="nf4")
    batch = batch_for("llama", tokenizer)
    tuned = peftkit.apply(model, peftkit.LoraConfig(dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    peftkit.save(tuned, tmp_path / "adapter")
    unmerged = logits(tuned, batch)
    merged = peftkit.merge(tuned)
    assert base_storage(merged) == "fp32" and type(merged).__name__ == "LlamaForCausalLM"
    assert getattr(merged.config, "quantization_config", None) is None
    torch.testing.assert_close(logits(merged, batch), unmerged, atol=1e-5, rtol=1e-5)
    # The pitfall: the same adapter merged into the weights before quantisation.
    original, _ = tiny("llama")
    wrong = peftkit.merge(peftkit.load(original, tmp_path / "adapter"))
    assert (logits(wrong, batch) - unmerged).abs().max() > 100 * 1e-5
    # A plain transformers model: it round-trips through save_pretrained.
    merged.save_pretrained(tmp_path / "merged")
    reloaded = type(merged).from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(reloaded, batch), unmerged, atol=1e-5, rtol=1e-5)


def test_bf16_compute_merges_into_bf16():
    """A base computing in bf16 merges into bf16 weights (or the dtype asked for); bf16
    dequant(W) is exactly what its quantised layers multiplied with, so the outputs agree to
    bf16 rounding of the sums."""
    model, tokenizer = tiny("llama", dtype="bf16", quantize="nf4")
    batch = batch_for("llama", tokenizer)
    tuned = peftkit.apply(model, peftkit.LoraConfig(dropout=0.0))
    unmerged = logits(tuned, batch)
    merged = peftkit.merge(tuned)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    # bf16 keeps 8 significant bits: every matmul rounds its output to 2^-8 relative, and
    # bitsandbytes' CPU kernel sums in another order than torch's bf16 matmul, so the two agree
    # to a few bf16 steps at the logits' largest magnitude (one run differed by 0.047).
    step = 2**-8 * unmerged.abs().max().item()
    torch.testing.assert_close(logits(merged, batch), unmerged, atol=16 * step, rtol=0)
    again, _ = tiny("llama", dtype="bf16", quantize="nf4")
    fp32 = peftkit.merge(peftkit.apply(again, peftkit.LoraConfig(dropout=0.0)), dtype="fp32")
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_summary_counts_the_weights_not_the_packed_bytes(kind):
    """A packed NF4 tensor holds two weights a byte: the parameter count is the float model's."""
    plain, _ = tiny("llama")
    quantized, _ = tiny("llama", quantize=kind)
    expected = sum(p.numel() for p in plain.parameters())
    assert peftkit.summary(quantized).total == expected
