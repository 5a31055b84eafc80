"""LoRA's update against the paper's closed form, rsLoRA's scale, targeting, merge and unmerge."""

import math

import pytest
import torch

import peftkit
from contract import batch_for, logits, tiny
from peftkit.errors import TargetError
from peftkit.targeting import resolve_targets


def _lora_layer(model, suffix):
    return next(m for n, m in model.named_modules() if n.endswith(suffix) and hasattr(m, "lora_A"))


@pytest.mark.parametrize(
    "config, scale",
    [
        (peftkit.LoraConfig(rank=4, alpha=8, dropout=0.0), 8 / 4),
        (peftkit.RsLoraConfig(rank=4, alpha=8, dropout=0.0), 8 / math.sqrt(4)),
    ],
    ids=["lora", "rslora"],
)
def test_update_equals_closed_form(config, scale):
    model, _ = tiny("llama")
    weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    tuned = peftkit.apply(model, config)
    layer = _lora_layer(tuned, "layers.0.self_attn.q_proj")
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(3, weight.shape[1])
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = x @ (weight + scale * b @ a).T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_default_targets_follow_each_architecture():
    expected = {
        "bert": {"query", "value"},
        "t5": {"q", "v"},
        "gpt2": {"c_attn"},
        "llama": {"q_proj", "v_proj"},
        "qwen2": {"q_proj", "v_proj"},
    }
    for family, names in expected.items():
        model, _ = tiny(family)
        found = {name.rsplit(".", 1)[-1] for name in resolve_targets(model, None)}
        assert found == names, family


def test_all_linear_skips_output_layer_and_regex_selects_exactly():
    model, _ = tiny("llama")
    everything = resolve_targets(model, "all-linear")
    assert "lm_head" not in everything and len(everything) == 2 * 7
    picked = resolve_targets(model, r".*layers\.1\.mlp\.(up|down)_proj")
    assert picked == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]


def test_target_that_matches_nothing_lists_what_exists():
    model, _ = tiny("llama")
    with pytest.raises(TargetError, match="matched no linear layer.*q_proj.*v_proj"):
        peftkit.apply(model, peftkit.LoraConfig(target_modules=["query_proj"]))
    # Nothing was injected: the model is still the plain base model.
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_merge_in_place_and_unmerge_restore_weights():
    model, tokenizer = tiny("gpt2")
    batch = batch_for("gpt2", tokenizer)
    base_logits = logits(model, batch)
    tuned = peftkit.apply(model, peftkit.LoraConfig(dropout=0.0))
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    unmerged = logits(tuned, batch)
    tuned.merge_adapter()  # PEFT's own merge and unmerge keep the LoRA layers in place
    torch.testing.assert_close(logits(tuned, batch), unmerged, atol=1e-4, rtol=1e-4)
    tuned.unmerge_adapter()
    with tuned.disable_adapter():
        torch.testing.assert_close(logits(tuned, batch), base_logits, atol=1e-5, rtol=0)


def test_summary_counts_match_closed_form():
    model, _ = tiny("llama")  # hidden 32, 2 layers; q: 32 -> 32, v: 32 -> 16 (2 kv heads x 8)
    tuned = peftkit.apply(model, peftkit.LoraConfig(rank=4))
    counts = peftkit.summary(tuned)
    r, layers = 4, 2
    expected = layers * (r * (32 + 32) + r * (32 + 16))
    assert counts.trainable == expected
    assert counts.total == sum(p.numel() for p in tuned.parameters())
    assert sum(counts.groups.values()) == expected
    assert "model.layers.*.self_attn.q_proj.lora_A.weight" in counts.groups
