"""(IA)^3: which modules each family's vectors sit on, what they compute (against weights scaled
by hand, the paper's formula), and the refusals of a feed-forward choice PEFT would reject."""

from __future__ import annotations

import re

import peft
import pytest
import torch

import peftkit
from contract import FAMILIES, batch_for, logits, tiny
from peftkit.errors import TargetError


def ia3_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The PEFT (IA)^3 layers of an applied model, by their base model's module name."""
    return {
        re.sub(r"^base_model\.model\.", "", name): module
        for name, module in model.named_modules()
        if isinstance(module, peft.tuners.ia3.IA3Layer)
    }


def intermediate_size(config) -> int:  # noqa: ANN001
    """The feed-forward network's inner width, read from the model config."""
    for key in ("intermediate_size", "d_ff", "n_inner"):
        if getattr(config, key, None):
            return getattr(config, key)
    return 4 * config.n_embd  # GPT-2's default inner width


# Each family's key and value projections, written out independently of targeting.py.
KEYS_VALUES = {
    "bert": r".*attention\.self\.(key|value)",
    "t5": r".*(SelfAttention|EncDecAttention)\.(k|v)",
    "gpt2": r".*attn\.c_attn",  # fused query, key and value
    "llama": r".*self_attn\.(k|v)_proj",
    "qwen2": r".*self_attn\.(k|v)_proj",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_default_vectors_sit_on_keys_values_and_the_feed_forward_activation(family):
    model, _ = tiny(family)
    config = model.config
    tuned = peftkit.apply(model, peftkit.IA3Config())
    layers = ia3_layers(tuned)
    feed_forward = {name for name, layer in layers.items() if layer.is_feedforward}
    # The feed-forward vectors rescale the intermediate activation: their layers' input is the
    # network's inner width, one per transformer layer (T5: encoder and decoder blocks).
    blocks = config.num_layers + config.num_decoder_layers if family == "t5" else 2
    assert len(feed_forward) == blocks
    for name in feed_forward:
        assert layers[name].in_features == intermediate_size(config), name
        assert layers[name].ia3_l["default"].numel() == intermediate_size(config)
    # Everything else is a key or value projection, all of them, and never the attention's
    # output projection (BERT's attention.output.dense, the trap of PEFT's own default).
    others = set(layers) - feed_forward
    every_key_value = {
        name
        for name, _ in tiny(family)[0].named_modules()
        if re.fullmatch(KEYS_VALUES[family], name)
    }
    assert others == every_key_value
    assert not any("attention.output" in name for name in layers)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_vectors_equal_hand_scaled_weights(family):
    """l * (W x + b) on keys and values, W (l * x) + b on the feed-forward input: the same
    logits as the base model with W's rows (or columns) and biases scaled by hand."""
    model, tokenizer = tiny(family)
    batch = batch_for(family, tokenizer)
    tuned = peftkit.apply(model, peftkit.IA3Config())
    scales = {}
    with torch.no_grad():
        for name, layer in ia3_layers(tuned).items():
            vector = layer.ia3_l["default"]
            vector.copy_(torch.rand_like(vector) + 0.5)
            scales[name] = (vector.detach().flatten().clone(), layer.is_feedforward)
    expected_model, _ = tiny(family)
    modules = dict(expected_model.named_modules())
    with torch.no_grad():
        for name, (vector, feed_forward) in scales.items():
            module = modules[name]
            conv1d = type(module).__name__ == "Conv1D"  # weight stored (in, out)
            in_dim = 0 if conv1d else 1
            out_dim = 1 - in_dim
            dim = in_dim if feed_forward else out_dim
            shape = [1, 1]
            shape[dim] = -1
            module.weight.mul_(vector.view(shape))
            if not feed_forward and module.bias is not None:
                module.bias.mul_(vector)
    # tiny() seeds the whole model, the new classifier head included: both heads are equal.
    torch.testing.assert_close(logits(tuned, batch), logits(expected_model, batch), atol=1e-5,
                               rtol=1e-5)  # fmt: skip


def test_peft_own_defaults_are_what_peftkit_corrects():
    """Why peftkit resolves (IA)^3's modules itself: PEFT 0.21's BERT default also rescales the
    input of the attention's output projection, and its Qwen2 default rescales queries."""
    bert, _ = tiny("bert")
    theirs = ia3_layers(peft.get_peft_model(bert, peft.IA3Config(task_type="SEQ_CLS")))
    assert theirs["bert.encoder.layer.0.attention.output.dense"].is_feedforward
    qwen, _ = tiny("qwen2")
    theirs = ia3_layers(peft.get_peft_model(qwen, peft.IA3Config(task_type="CAUSAL_LM")))
    assert "model.layers.0.self_attn.q_proj" in theirs
    assert "model.layers.0.self_attn.k_proj" not in theirs
    ours = ia3_layers(peftkit.apply(tiny("qwen2")[0], peftkit.IA3Config()))
    assert "model.layers.0.self_attn.k_proj" in ours
    assert "model.layers.0.self_attn.q_proj" not in ours


def test_feed_forward_modules_must_be_among_the_targets():
    model, _ = tiny("llama")
    config = peftkit.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=["up_proj"])
    with pytest.raises(TargetError, match="must be among target_modules.*up_proj"):
        peftkit.apply(model, config)
    assert not ia3_layers(model), "a refused config must leave the model untouched"


def test_a_feed_forward_spec_matching_nothing_is_refused():
    model, _ = tiny("llama")
    with pytest.raises(TargetError, match="matched no linear layer"):
        peftkit.apply(model, peftkit.IA3Config(feedforward_modules=["fc_out"]))


def test_chosen_targets_take_the_family_feed_forward_among_them():
    """With all-linear targets the second feed-forward projection is still the one rescaled on
    its input; with targets that leave it out, no module is feed-forward."""
    every_linear = peftkit.IA3Config(target_modules="all-linear")
    every = ia3_layers(peftkit.apply(tiny("llama")[0], every_linear))
    assert len(every) == 2 * 7
    assert {n for n, layer in every.items() if layer.is_feedforward} == {
        "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
    }  # fmt: skip
    values_only = peftkit.IA3Config(target_modules=["v_proj"])
    attention = ia3_layers(peftkit.apply(tiny("llama")[0], values_only))
    assert len(attention) == 2 and not any(layer.is_feedforward for layer in attention.values())
