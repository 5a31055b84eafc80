"""Adapters saved by peftkit are PEFT's own files: peft.PeftModel.from_pretrained loads them."""

import json

import peft
import pytest
import torch

import peftkit
from contract import FAMILIES, batch_for, logits, tiny


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("config", [peftkit.LoraConfig(dropout=0.0), peftkit.DoraConfig(rank=4)])
def test_peft_loads_peftkit_adapter_with_same_logits(family, config, tmp_path):
    model, tokenizer = tiny(family)
    batch = batch_for(family, tokenizer)
    tuned = peftkit.apply(model, config)
    with torch.no_grad():  # give B (zero at init) real values so the adapter matters
        for name, parameter in tuned.named_parameters():
            if "lora_B" in name or "classifier" in name or "score" in name:
                parameter.normal_(std=0.5)
    expected = logits(tuned, batch)
    peftkit.save(tuned, tmp_path / "adapter")

    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and "peftkit_method" not in saved
    base, _ = tiny(family)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=0)


def test_peftkit_loads_adapter_written_by_peft(tmp_path):
    model, tokenizer = tiny("llama")
    batch = batch_for("llama", tokenizer)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"])
    tuned = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    expected = logits(tuned, batch)
    tuned.save_pretrained(tmp_path / "peft-adapter")
    base, _ = tiny("llama")
    loaded = peftkit.load(base, tmp_path / "peft-adapter")
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=0)
    assert peftkit.api.applied(loaded).config.rank == 4
