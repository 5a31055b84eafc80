"""Bottleneck adapters (Houlsby, Pfeiffer; contract rows in test_contract.py): parameter counts
against the closed form, placement against an independent module-wrapping reference, generation,
and every bad input."""

import json
import re

import pytest
import torch
from torch import nn

import peftkit
from contract import FAMILIES, batch_for, logits, tiny
from peftkit.errors import AdapterError, ConfigError, TargetError
from peftkit.methods.bottleneck import BottleneckConfig


def config_for(placement: str, **options) -> BottleneckConfig:
    return BottleneckConfig(placement=placement, bottleneck_size=4, **options)


def sublayers(family: str, config) -> tuple[int, int]:
    """(attention sublayers that get an adapter, feed-forward sublayers), from the model config."""
    if family == "t5":
        blocks = config.num_layers + config.num_decoder_layers  # self-attention only, no cross
        return blocks, blocks
    return config.num_hidden_layers, config.num_hidden_layers


def norm_parameters(family: str, config) -> int:
    """Layer-norm parameters inside the layers: two norms per layer (T5 decoder: three)."""
    hidden = config.hidden_size
    if family in ("bert", "gpt2"):
        return config.num_hidden_layers * 2 * (2 * hidden)  # weight and bias
    if family == "t5":
        return (2 * config.num_layers + 3 * config.num_decoder_layers) * hidden  # weight only
    return config.num_hidden_layers * 2 * hidden  # RMSNorm: weight only


def head_parameters(family: str, config) -> int:
    """The fresh classification head of the BERT matrix model (the others are language models)."""
    return config.hidden_size * config.num_labels + config.num_labels if family == "bert" else 0


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("size", [1, 4])
def test_trainable_count_matches_closed_form(family, placement, size):
    base, _ = tiny(family)
    config = base.config
    attention, feed_forward = sublayers(family, config)
    sites = attention + feed_forward if placement == "houlsby" else feed_forward
    hidden = config.hidden_size
    per_adapter = 2 * hidden * size + size + hidden  # down and up weights, their biases
    expected = sites * per_adapter + head_parameters(family, config)
    if placement == "houlsby":
        expected += norm_parameters(family, config)
    model = peftkit.apply(base, BottleneckConfig(placement=placement, bottleneck_size=size))
    assert peftkit.summary(model).trainable == expected


def test_reduction_factor_sets_the_width():
    base, _ = tiny("llama")  # hidden 32, 2 layers: 32 / 8 = 4
    config = BottleneckConfig(placement="pfeiffer", reduction_factor=8)
    model = peftkit.apply(base, config)
    assert peftkit.summary(model).trainable == 2 * (2 * 32 * 4 + 4 + 32)


def test_layers_option_adapts_only_those_layers():
    base, _ = tiny("gpt2")
    model = peftkit.apply(base, config_for("houlsby", layers=[1], train_layer_norms=False))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".h.1." in n for n in names)
    assert peftkit.summary(model).trainable == 2 * (2 * 32 * 4 + 4 + 32)


def test_classification_head_trains_with_the_adapters():
    base, _ = peftkit.load_model("tiny-llama", "classification")
    model = peftkit.apply(base, config_for("pfeiffer"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable
    assert all("bottleneck_adapter" in n or n == "score.weight" for n in trainable)


class Wrapped(nn.Module):
    """Independent reference: a module followed by an adapter on its output, plus the residual."""

    def __init__(self, inner: nn.Module, adapter: nn.Module, renorm: bool) -> None:
        super().__init__()
        self.inner, self.adapter, self.renorm = inner, adapter, renorm

    def forward(self, hidden, *args, **kwargs):
        out = self.inner(hidden, *args, **kwargs)
        if self.renorm:  # Pfeiffer in post-norm BERT: LN(z + A(LN(z)))
            return self.inner(hidden + self.adapter(out))
        return out + self.adapter(out)


def perturb_adapters(model: nn.Module) -> None:
    """Give every up-projection non-zero weights so the adapters change the output."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "bottleneck_adapter.up" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


@pytest.mark.parametrize(
    "family,placement,sites,renorm",
    [
        ("llama", "houlsby", [r"self_attn.o_proj", r"mlp.down_proj"], False),
        ("gpt2", "houlsby", [r"attn.resid_dropout", r"mlp.dropout"], False),
        ("bert", "houlsby", [r"attention.output.dropout", r"\d.output.dropout"], False),
        ("bert", "pfeiffer", [r"\d.output.LayerNorm"], True),
        ("qwen2", "pfeiffer", [r"layers.\d"], False),
    ],
)
def test_placement_matches_module_wrapping_reference(family, placement, sites, renorm):
    model, tokenizer = tiny(family)
    batch = batch_for(family, tokenizer)
    adapted = peftkit.apply(model, config_for(placement, train_layer_norms=False))
    perturb_adapters(adapted)
    hooked = logits(adapted, batch)
    adapters = {
        name.removesuffix(".bottleneck_adapter"): module
        for name, module in adapted.named_modules()
        if name.endswith("bottleneck_adapter")
    }
    assert all(any(re.search(s, n) for s in sites) for n in adapters)
    reference, _ = tiny(family)
    for name, adapter in adapters.items():
        parent_name, _, child = name.rpartition(".")
        parent = reference.get_submodule(parent_name)
        if isinstance(parent, nn.ModuleList):
            parent[int(child)] = Wrapped(parent[int(child)], adapter, renorm)
        else:
            setattr(parent, child, Wrapped(getattr(parent, child), adapter, renorm))
    torch.testing.assert_close(logits(reference, batch), hooked, atol=1e-5, rtol=0)
    assert not torch.allclose(hooked, logits(tiny(family)[0], batch), atol=1e-3)


@pytest.mark.parametrize("family", ["t5", "gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_generate(family, placement):
    base, tokenizer = tiny(family)
    prompt = tokenizer(["the cat"], return_tensors="pt")
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    expected = base.generate(**prompt, **options)
    model = peftkit.apply(base, config_for(placement))
    assert torch.equal(model.generate(**prompt, **options), expected)  # identical at init
    perturb_adapters(model)
    cached = model.generate(**prompt, **options, use_cache=True)
    uncached = model.generate(**prompt, **options, use_cache=False)
    assert torch.equal(cached, uncached)  # the adapters act per position: caching is unaffected


def test_merge_refuses_with_a_clear_message():
    base, _ = tiny("gpt2")
    model = peftkit.apply(base, config_for("houlsby"))
    with pytest.raises(AdapterError, match="bottleneck.*cannot be folded"):
        peftkit.merge(model)


def test_saved_folder_is_a_peftkit_adapter(tmp_path):
    base, _ = tiny("bert")
    model = peftkit.apply(base, config_for("pfeiffer"))
    peftkit.save(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peftkit_method"] == "bottleneck" and "peft_type" not in saved
    assert saved["placement"] == "pfeiffer" and saved["bottleneck_size"] == 4
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_remove_restores_the_base_model():
    base, tokenizer = tiny("llama")
    batch = batch_for("llama", tokenizer)
    reference = logits(base, batch)
    model = peftkit.apply(base, config_for("houlsby"))
    perturb_adapters(model)
    restored = peftkit.api.applied(model).method.take_out(model)
    assert not any("bottleneck" in n for n, _ in restored.named_parameters())
    assert all(p.requires_grad for p in restored.parameters())
    torch.testing.assert_close(logits(restored, batch), reference, atol=0, rtol=0)


def test_yaml_style_options():
    config = peftkit.api.config_for("bottleneck", placement="pfeiffer", layers=[0], modules=None)
    assert config == BottleneckConfig(placement="pfeiffer", layers=[0])


# Bad input


def test_modules_matching_nothing_lists_what_exists():
    base, _ = tiny("bert")
    with pytest.raises(TargetError, match=r"matched no module.*attention\.output\.dense"):
        peftkit.apply(base, BottleneckConfig(modules=["no_such_module"]))


def test_architecture_without_defaults_asks_for_modules():
    model = nn.Sequential(nn.Linear(4, 4))
    model.config = type("Config", (), {"model_type": "mystery", "hidden_size": 4})()
    with pytest.raises(TargetError, match=r"No default bottleneck placement.*'mystery'.*modules"):
        peftkit.apply(model, BottleneckConfig())


def test_user_modules_work_on_any_architecture():
    base, _ = tiny("llama")
    model = peftkit.apply(base, BottleneckConfig(modules=["mlp"], bottleneck_size=2))
    assert peftkit.summary(model).trainable == 2 * (2 * 32 * 2 + 2 + 32) + 2 * 2 * 32


def test_adapter_takes_the_width_of_the_module_it_follows():
    base, tokenizer = tiny("llama")  # up_proj: 32 -> 64
    config = BottleneckConfig(modules=["up_proj"], bottleneck_size=2, train_layer_norms=False)
    model = peftkit.apply(base, config)
    assert peftkit.summary(model).trainable == 2 * (2 * 64 * 2 + 2 + 64)
    perturb_adapters(model)
    logits(model, batch_for("llama", tokenizer))  # runs: the adapter fits the 64-wide output


@pytest.mark.parametrize("size", [0, -3])
def test_bottleneck_size_below_one(size):
    with pytest.raises(ConfigError, match="bottleneck_size must be at least 1"):
        BottleneckConfig(bottleneck_size=size)


def test_reduction_factor_giving_zero():
    base, _ = tiny("gpt2")  # hidden 32
    with pytest.raises(ConfigError, match="gives a bottleneck of 0 for hidden size 32"):
        peftkit.apply(base, BottleneckConfig(reduction_factor=64))


def test_reduction_factor_not_positive():
    with pytest.raises(ConfigError, match="reduction_factor must be positive"):
        BottleneckConfig(reduction_factor=0)


def test_unknown_placement_and_nonlinearity():
    with pytest.raises(ConfigError, match="placement must be one of houlsby, pfeiffer"):
        BottleneckConfig(placement="lin")
    with pytest.raises(ConfigError, match="Did you mean 'relu'"):
        BottleneckConfig(nonlinearity="reLu")


def test_layers_that_do_not_exist():
    base, _ = tiny("llama")
    with pytest.raises(ConfigError, match=r"layers \[7\] do not exist.*\[0, 1\]"):
        peftkit.apply(base, BottleneckConfig(layers=[0, 7]))


def test_applying_twice_is_refused():
    base, _ = tiny("llama")
    model = peftkit.apply(base, BottleneckConfig())
    with pytest.raises(AdapterError, match="already has bottleneck adapters"):
        peftkit.apply(model, BottleneckConfig())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gradient_checkpointing_gives_the_same_gradients(family):
    grads = []
    for checkpointing in (False, True):
        base, tokenizer = tiny(family)
        if checkpointing:
            base.gradient_checkpointing_enable({"use_reentrant": False})
        model = peftkit.apply(base, config_for("pfeiffer"))
        perturb_adapters(model)
        model.train()
        model(**batch_for(family, tokenizer)).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)


def test_output_hidden_states_record_the_adapted_stream():
    model, tokenizer = tiny("llama")
    batch = batch_for("llama", tokenizer)
    with torch.no_grad():  # transformers installs its capture hooks now, before ours
        model(**batch, output_hidden_states=True)
    model = peftkit.apply(model, config_for("pfeiffer"))
    perturb_adapters(model)
    seen = []
    layer = model.model.layers[0]
    handle = layer.register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    handle.remove()
    torch.testing.assert_close(seen[0], hidden[1])  # the adapter's hook runs first
