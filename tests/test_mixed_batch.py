"""Mixed-adapter batches on transformers 5.24 / PEFT 0.21.2: in one call, each row's logits (and
generated tokens) equal those of a separate call with only that row's adapter active, or none."""

import pytest
import torch

import peftkit
from contract import FAMILIES, batch_for, tiny
from peftkit.errors import AdapterError, DataError
from peftkit.methods.lora import compose
from peftkit.methods.lora.mixed_batch import mixed_forward, mixed_generate


def _adapter(folder, family, seed, rank):
    """A LoRA adapter with non-zero B (as after training), default targets of the family."""
    base, _ = tiny(family)
    torch.manual_seed(seed)
    model = peftkit.apply(base, peftkit.LoraConfig(rank=rank, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(0, 0.3)
    peftkit.save(model, folder)
    return folder


def _served(family, tmp_path):
    folders = {
        "a": _adapter(tmp_path / "a", family, seed=1, rank=2),
        "b": _adapter(tmp_path / "b", family, seed=2, rank=4),
    }
    return compose.load_adapters(tiny(family)[0], folders).eval()


def _alone(model, name, inputs):
    """Logits of the whole batch through one adapter (None: the base), the ordinary way."""
    with torch.no_grad():
        if name is None:
            with model.disable_adapter():
                return model(**inputs).logits
        compose.set_active(model, name)
        return model(**inputs).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_row_matches_its_own_adapter(family, tmp_path):
    model = _served(family, tmp_path)
    _, tokenizer = tiny(family)
    inputs = batch_for(family, tokenizer)
    if FAMILIES[family] != "seq2seq":  # seq2seq keeps labels: they make the decoder inputs
        inputs.pop("labels")
    rows = ["a", "b", None]
    mixed = mixed_forward(model, rows, **inputs).logits
    base_logits = tiny(family)[0](**inputs).logits.detach()
    for i, name in enumerate(rows):
        alone = _alone(model, name, inputs)
        torch.testing.assert_close(mixed[i], alone[i], atol=1e-5, rtol=0)
    # The adapters really differ from each other and from the base on these rows.
    assert not torch.allclose(_alone(model, "a", inputs)[0], base_logits[0], atol=1e-3)
    assert not torch.allclose(_alone(model, "b", inputs)[1], _alone(model, "a", inputs)[1])
    torch.testing.assert_close(mixed[2], base_logits[2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("beams", [1, 2])
def test_generate_rows_match_their_own_adapter(family, beams, tmp_path):
    model = _served(family, tmp_path)
    _, tokenizer = tiny(family)
    tokenizer.padding_side = "left"
    inputs = dict(tokenizer(["the cat sat", "a dog", "peft"], return_tensors="pt", padding=True))
    options = {"max_new_tokens": 5, "do_sample": False, "num_beams": beams, "min_new_tokens": 5}
    rows = ["b", None, "a"]
    mixed = mixed_generate(model, rows, **inputs, **options)
    for i, name in enumerate(rows):
        if name is None:
            with model.disable_adapter():
                alone = model.generate(**inputs, **options)
        else:
            compose.set_active(model, name)
            alone = model.generate(**inputs, **options)
        assert torch.equal(mixed[i], alone[i]), (name, mixed[i], alone[i])


def test_bad_input(tmp_path):
    model = _served("llama", tmp_path)
    _, tokenizer = tiny("llama")
    inputs = dict(tokenizer(["x", "y"], return_tensors="pt", padding=True))
    with pytest.raises(AdapterError, match=r"\['c'\] not loaded; loaded adapters: \['a', 'b'\]"):
        mixed_forward(model, ["a", "c"], **inputs)
    with pytest.raises(DataError, match="one adapter name"):
        mixed_forward(model, ["a"], **inputs)
    model.train()
    with pytest.raises(AdapterError, match="model.eval"):
        mixed_forward(model, ["a", None], **inputs)
