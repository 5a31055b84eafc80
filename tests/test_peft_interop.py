"""peftkit loads LoRA adapters written by PEFT itself. (PEFT loading peftkit's files, for every
PEFT-format method and family, is a check of the contract table in test_contract.py.)"""

import peft
import torch

import peftkit
from contract import batch_for, logits, tiny


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
