"""The base's dtype is peftkit's choice, for every registered method (the contract table's rows)
on every tiny family: a checkpoint saved in bf16 (as most published ones are) loads in float32
unless the recipe asks for less; on a bf16 base the frozen weights stay bf16 and every trainable
parameter is a float32 master, so an update below bf16's resolution still lands; methods that
change the base's own weights refuse a half-precision base, naming the methods that work."""

from __future__ import annotations

import pytest
import torch
from test_contract import CASES

import peftkit
from contract import FAMILIES, batch_for, logits, prepare_method
from peftkit.errors import ConfigError
from peftkit.models import load_model
from peftkit.registry import method_for_config

ROWS = [
    pytest.param(case, family, id=f"{case.label}-{family}")
    for case in CASES
    for family in FAMILIES
    if family not in case.excluded  # a family the method refuses (test_contract checks that)
]
START, STEP = 3 / 64, 1e-4  # 3/64 is exact in bf16, which rounds 3/64 +- 1e-4 back to it


@pytest.fixture(scope="module")
def bf16_folders(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each tiny family saved as a bf16 checkpoint."""
    folders = {}
    for family, task in FAMILIES.items():
        model, tokenizer = load_model(f"tiny-{family}", task)
        folder = tmp_path_factory.mktemp(f"bf16-{family}")
        model.to(torch.bfloat16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[family] = str(folder)
    return folders


def test_the_checkpoint_really_is_bf16(bf16_folders):
    """transformers alone keeps the checkpoint's dtype: the choice below is peftkit's."""
    import transformers

    plain = transformers.AutoModelForCausalLM.from_pretrained(bf16_folders["llama"])
    assert plain.model.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(("case", "family"), ROWS)
def test_default_base_trains_float32_parameters(case, family, bf16_folders):
    model, _ = load_model(bf16_folders[family], FAMILIES[family])
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    tuned = peftkit.apply(model, case.config(family))
    assert all(p.dtype == torch.float32 for p in tuned.parameters() if p.requires_grad)


@pytest.mark.parametrize(("case", "family"), ROWS)
def test_a_bf16_base_keeps_float32_masters(case, family, bf16_folders, tmp_path):
    model, tokenizer = load_model(bf16_folders[family], FAMILIES[family], dtype="bf16")
    config = case.config(family)
    if method_for_config(config).needs_float32_base:
        with pytest.raises(ConfigError, match="cannot train on a base stored in bf16") as refused:
            peftkit.apply(model, config)
        assert "use a method that keeps the base frozen: lora" in str(refused.value)
        return
    batch = batch_for(family, tokenizer)
    tuned = peftkit.apply(model, config)
    hooks = prepare_method(tuned, config, [batch])
    trainable = [p for p in tuned.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    frozen = [p for p in tuned.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen if p.dtype.is_floating_point)

    tuned.train()
    loss = tuned(**batch).loss
    if hooks.extra_loss is not None:
        loss = loss + hooks.extra_loss(tuned)
    loss.backward()
    moved = [p for p in trainable if p.grad is not None and p.grad.abs().max() > 0]
    assert moved, "no trainable parameter got a gradient"
    assert all(p.grad.dtype == torch.float32 for p in moved)
    # Steps of 1e-4 from 3/64, each below half of bf16's spacing there (2^-12): a bf16 weight
    # would stay 3/64 and the outputs would not move; float32 masters accumulate them, and the
    # model's next forward pass computes with the accumulated value.
    with torch.no_grad():
        for parameter in moved:
            parameter.fill_(START)
        at_one = logits(tuned, batch)
        for parameter in moved:
            step = STEP * parameter.grad.sign()
            for _ in range(100):
                parameter -= step
            torch.testing.assert_close(parameter, START - 100 * step, atol=1e-5, rtol=0)
        stepped = logits(tuned, batch)
    assert torch.isfinite(stepped).all() and not torch.equal(stepped, at_one)

    # The float32 values survive saving and loading onto a fresh bf16 base.
    peftkit.save(tuned, tmp_path / "adapter")
    fresh, _ = load_model(bf16_folders[family], FAMILIES[family], dtype="bf16")
    loaded = peftkit.load(fresh, tmp_path / "adapter")
    assert all(p.dtype == torch.float32 for p in loaded.parameters() if p.requires_grad)
    torch.testing.assert_close(logits(loaded, batch), logits(tuned, batch), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["bf17", "int4", "float32"])
def test_an_unknown_base_dtype_is_refused(name):
    with pytest.raises(ConfigError, match="Unknown base dtype"):
        load_model("tiny-llama", dtype=name)
