"""LoftQ: the NF4 quantiser against its definition, the alternating fit against Eckart-Young, and
what LoftQ promises: base + adapter closer to the full-precision weights (and outputs) than the
quantised base alone, with the LoRA scale accounted for (alpha != r here)."""

import json

import pytest
import torch

import peftkit
from contract import batch_for, logits, tiny
from peftkit.errors import ConfigError
from peftkit.methods.lora.init import lora_layers
from peftkit.methods.lora.loftq import NF4_LEVELS, loftq_factors, nf4_round_trip


def test_nf4_levels_are_the_normal_quantiles_of_qlora():
    # QLoRA's construction (bitsandbytes create_normal_map): 8 positive quantiles between 1/2 and
    # an offset, 7 negative ones, an exact zero, scaled so the largest is 1.
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    offset = 0.9677083
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    levels = levels / levels.abs().max()
    torch.testing.assert_close(torch.tensor(NF4_LEVELS, dtype=torch.float64), levels, atol=1e-6,
                               rtol=0)  # fmt: skip


def test_nf4_round_trip_rounds_each_block_to_its_nearest_level():
    torch.manual_seed(0)
    weight = torch.randn(40, 50) * 0.1  # 2000 values: 31 full blocks of 64 and a short one
    restored = nf4_round_trip(weight)
    flat, out = weight.reshape(-1), restored.reshape(-1)
    levels = torch.tensor(NF4_LEVELS)
    for start in range(0, flat.numel(), 64):
        block, got = flat[start : start + 64], out[start : start + 64]
        absmax = block.abs().max()
        nearest = levels[(block[:, None] / absmax - levels).abs().argmin(dim=1)] * absmax
        torch.testing.assert_close(got, nearest, atol=1e-7, rtol=0)
        assert got.abs().max() == absmax  # the block's largest value is kept exactly
    assert torch.equal(nf4_round_trip(restored), restored), "quantised values stay put"


def test_one_iteration_is_the_best_rank_r_fit_of_the_quantisation_error():
    torch.manual_seed(1)
    weight = torch.randn(24, 40)
    quantised, a, b = loftq_factors(weight, rank=3, scale=2.0, iterations=1)
    assert torch.equal(quantised, nf4_round_trip(weight))
    error = torch.linalg.matrix_norm(weight - quantised - 2.0 * b @ a)
    tail = torch.linalg.svdvals(weight - quantised)[3:]
    torch.testing.assert_close(error, tail.square().sum().sqrt(), atol=1e-5, rtol=1e-4)


def _errors(model, originals):
    """Per adapted layer: (|W - Q|, |W - (Q + s B A)|) against the full-precision weight."""
    found = {}
    for name, layer in lora_layers(model).items():
        weight = originals[name]
        q = layer.get_base_layer().weight.detach()
        with torch.no_grad():
            delta = layer.get_delta_weight("default")  # in the weight's own layout
        found[name] = (
            float(torch.linalg.matrix_norm(weight - q)),
            float(torch.linalg.matrix_norm(weight - q - delta)),
        )
    return found


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_loftq_brings_base_plus_adapter_closer_to_full_precision(family, tmp_path):
    base, tokenizer = tiny(family)
    batch = batch_for(family, tokenizer)
    full_precision = logits(base, batch)
    originals = {n: m.weight.detach().clone() for n, m in base.named_modules()
                 if hasattr(m, "weight") and isinstance(m.weight, torch.Tensor)}  # fmt: skip
    config = peftkit.LoraConfig(rank=8, alpha=32, dropout=0.0, target_modules="all-linear",
                                init="loftq", loftq_iterations=3)  # fmt: skip
    model = peftkit.apply(base, config)
    for name, (quantised_only, with_adapter) in _errors(model, originals).items():
        assert with_adapter < 0.9 * quantised_only, f"{name}: {with_adapter} vs {quantised_only}"
    # Outputs: base + adapter nearer the full-precision model than the quantised base alone.
    with_adapter = (logits(model, batch) - full_precision).abs().mean()
    with model.disable_adapter():
        quantised_only = (logits(model, batch) - full_precision).abs().mean()
    assert with_adapter < quantised_only
    # Saved as PEFT names it; loading runs the same LoftQ on a fresh base: the same model.
    peftkit.save(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "loftq"
    assert saved["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 3}
    loaded = peftkit.load(tiny(family)[0], tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-5, rtol=0)


def test_more_iterations_do_not_lose_ground():
    torch.manual_seed(2)
    weight = torch.randn(64, 96) * 0.05
    errors = []
    for iterations in (1, 5):
        q, a, b = loftq_factors(weight, rank=8, scale=0.5, iterations=iterations)
        errors.append(float(torch.linalg.matrix_norm(weight - q - 0.5 * b @ a)))
    assert errors[1] <= errors[0] * 1.001, errors


def test_loftq_needs_full_precision_weights():
    base, _ = tiny("llama")
    for module in base.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.shape[0] == 32:
            module.weight = torch.nn.Parameter(module.weight.to(torch.int8), requires_grad=False)
            break
    with pytest.raises(ConfigError, match="quantises the full-precision weights itself"):
        peftkit.apply(base, peftkit.LoraConfig(init="loftq", target_modules="all-linear"))
