"""Per-row LoRA for serving (methods/lora/rows.py): the stacked, gathered update gives each row the
logits PEFT's own mixed batch gives it (an independent implementation), the serving model is the
base outside a per-row forward, adapters come and go, and what the stack cannot hold goes
through PEFT's path or is refused."""

from __future__ import annotations

import peft
import pytest
import torch
from serve_support import MODEL, make_adapter

import peftkit
from peftkit.errors import AdapterError
from peftkit.methods.lora import compose
from peftkit.methods.lora.mixed_batch import mixed_forward
from peftkit.methods.lora.rows import STACK_ATTRIBUTE, add, forward, remove
from peftkit.models import load_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(root / "a", seed=1, rank=2),
        "b": make_adapter(root / "b", seed=2, rank=4, targets=["q_proj", "k_proj", "down_proj"]),
    }


def inputs(rows: int = 3):
    _, tokenizer = load_model(MODEL, "causal-lm")
    tokenizer.padding_side = "left"
    texts = ["the cat sat", "a dog", "peft is small", "x"][:rows]
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


def serving(folders, names):
    model = load_model(MODEL, "causal-lm")[0]
    for name in names:
        model = add(model, name, folders[name])
    return model


def reference(folders, names):
    """PEFT's own multi-adapter model, for its mixed-batch forward."""
    return compose.load_adapters(
        load_model(MODEL, "causal-lm")[0], {n: folders[n] for n in names}
    ).eval()


def test_each_row_gets_the_logits_of_peft_mixed_batches(folders):
    model, batch = serving(folders, ["a", "b"]), inputs(4)
    assert getattr(model, STACK_ATTRIBUTE) is not None  # the stacked path is in use
    rows = ["b", None, "a", "b"]
    with torch.no_grad():
        got = forward(model, rows, **batch).logits
    expected = mixed_forward(reference(folders, ["a", "b"]), rows, **batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        base = load_model(MODEL, "causal-lm")[0](**batch).logits
        outside = model(**batch).logits  # no per-row forward: the base alone
    torch.testing.assert_close(got[1], base[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(outside, base, atol=1e-6, rtol=0)
    assert (got[0] - base[0]).abs().max() > 1e-2 and (got[2] - got[0]).abs().max() > 1e-2


def test_adapters_come_and_go(folders):
    model, batch = serving(folders, ["a", "b"]), inputs()
    model = remove(model, "a")
    with pytest.raises(AdapterError, match=r"\['a'\] not loaded; loaded adapters: \['b'\]"):
        forward(model, ["a", None, "b"], **batch)
    with torch.no_grad():
        got = forward(model, ["b", None, "b"], **batch).logits
    expected = mixed_forward(reference(folders, ["b"]), ["b", None, "b"], **batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    model = remove(model, "b")
    assert not isinstance(model, peft.PeftModel)
    assert not any("lora" in name for name, _ in model.named_modules())
    model = add(model, "a", folders["a"])
    with torch.no_grad():
        again = forward(model, ["a", "a", None], **batch).logits
    expected = mixed_forward(reference(folders, ["a"]), ["a", "a", None], **batch).logits
    torch.testing.assert_close(again, expected, atol=1e-5, rtol=0)


def test_adapters_the_stack_cannot_hold_take_peft_path(folders, tmp_path):
    base = load_model(MODEL, "causal-lm")[0]
    config = peft.LoraConfig(
        r=2, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False
    )
    peft.get_peft_model(base, config).save_pretrained(tmp_path / "embedding")
    folders = {**folders, "embedding": str(tmp_path / "embedding")}
    model, batch = serving(folders, ["a", "embedding"]), inputs()
    assert getattr(model, STACK_ATTRIBUTE) is None
    rows = ["embedding", "a", None]
    with torch.no_grad():
        got = forward(model, rows, **batch).logits
    expected = mixed_forward(reference(folders, ["a", "embedding"]), rows, **batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_dora_adapters_are_refused(tmp_path):
    base = load_model(MODEL, "causal-lm")[0]
    dora = peftkit.save(peftkit.apply(base, peftkit.DoraConfig(rank=2)), tmp_path / "dora")
    with pytest.raises(AdapterError, match="DoRA adapter.*peftkit merge"):
        add(load_model(MODEL, "causal-lm")[0], "d", dora)


def test_one_name_per_row_and_inference_mode(folders):
    model, batch = serving(folders, ["a"]), inputs()
    with pytest.raises(AdapterError, match="one adapter name"):
        forward(model, ["a"], **batch)
    model.train()
    with pytest.raises(AdapterError, match="model.eval"):
        forward(model, ["a", None, None], **batch)
