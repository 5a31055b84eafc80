"""The merges of lora_compose checked against their definitions, computed here on small matrices
from the saved A and B tensors: task arithmetic (the exact weighted sum), TIES (trim to the top
`density` share by magnitude, elect signs by the summed kept values, average the kept values that
agree), DARE (keep with probability `density`, rescale by 1 / density; then sum, or TIES without
the trim). The `_svd` forms work on the full deltas and, at full rank, equal the definition; the
factor forms apply the same operation to A and to B. DARE's random draws are observed (a spy on
torch.bernoulli records the masks) and the arithmetic is checked given them."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from contract import tiny
from peftkit.errors import AdapterError, ConfigError
from peftkit.methods.lora import compose


def _adapter(folder, seed, rank=4, alpha=8.0, targets=("q_proj",)):
    """A LoRA adapter on tiny Llama with random non-zero A and B, saved by peftkit."""
    torch.manual_seed(seed)
    model = peftkit.apply(
        tiny("llama")[0],
        peftkit.LoraConfig(rank=rank, alpha=alpha, dropout=0.0, target_modules=list(targets)),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peftkit.save(model, folder)
    return folder


def _factors(folder):
    """module -> (B, A, scale) straight from the files."""
    saved = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    scale = saved["lora_alpha"] / saved["r"]
    return {
        key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): (
            tensors[key.replace("lora_A", "lora_B")], a, scale)
        for key, a in tensors.items() if key.endswith("lora_A.weight")
    }  # fmt: skip


@pytest.fixture
def pair(tmp_path):
    folders = {"x": _adapter(tmp_path / "x", 1), "y": _adapter(tmp_path / "y", 2, alpha=4.0)}
    model = compose.load_adapters(tiny("llama")[0], folders)
    factors = {name: _factors(folder) for name, folder in folders.items()}
    return model, factors


def _deltas(factors, module):
    return [s * b @ a for b, a, s in (factors["x"][module], factors["y"][module])]


def trim(delta, density):
    """Keep the top `density` share of entries by magnitude (TIES step 1)."""
    keep = int(density * delta.numel())
    if keep >= delta.numel():
        return delta.clone()
    threshold = delta.abs().flatten().sort(descending=True).values[keep - 1]
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def disjoint_mean(tensors, weights):
    """TIES steps 2 and 3 per entry: the sign of the summed (unweighted) values wins; the mean of
    the weighted values that are non-zero and share it."""
    stacked = torch.stack(tensors)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(stacked) == elected
    weighted = stacked * torch.tensor(weights)[:, None, None]
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def ties(tensors, weights, density):
    return disjoint_mean([trim(t, density) for t in tensors], weights)


def test_task_arithmetic_is_the_exact_weighted_sum(pair):
    model, factors = pair
    compose.combine(model, ["x", "y"], [0.7, -0.3], "ta", how="task_arithmetic")
    for module, delta in compose.delta_weights(model, "ta").items():
        dx, dy = _deltas(factors, module)
        torch.testing.assert_close(delta, 0.7 * dx - 0.3 * dy, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.8, 0.4]])
def test_ties_svd_at_full_rank_is_ties_on_the_deltas(pair, weights):
    model, factors = pair
    compose.combine(model, ["x", "y"], weights, "t", how="ties_svd", density=0.3, svd_rank=32)
    for module, delta in compose.delta_weights(model, "t").items():
        expected = ties(_deltas(factors, module), weights, 0.3)
        torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-4)
        if weights == [1.0, 1.0]:  # the paper's form: lambda = 1 times the disjoint mean
            kept = [trim(d, 0.3) for d in _deltas(factors, module)]
            entry = (0, 0)
            values = [float(k[entry]) for k in kept if float(k[entry]) != 0.0]
            if values:
                sign = math.copysign(1.0, sum(values)) if sum(values) != 0 else 1.0
                agreeing = [v for v in values if math.copysign(1.0, v) == sign]
                assert math.isclose(float(delta[entry]), sum(agreeing) / len(agreeing),
                                    rel_tol=1e-4, abs_tol=1e-6)  # fmt: skip


def _spy_on_bernoulli(monkeypatch):
    masks = []
    real = torch.bernoulli

    def recording(*args, **kwargs):
        mask = real(*args, **kwargs)
        masks.append(mask.clone())
        return mask

    monkeypatch.setattr(torch, "bernoulli", recording)
    return masks


@pytest.mark.parametrize("how", ["dare_linear_svd", "dare_ties_svd"])
def test_dare_drops_rescales_then_sums_or_ties(pair, how, monkeypatch):
    model, factors = pair
    masks = _spy_on_bernoulli(monkeypatch)
    torch.manual_seed(3)
    compose.combine(model, ["x", "y"], [0.6, 0.9], "d", how=how, density=0.4, svd_rank=32)
    modules = list(compose.delta_weights(model, "d"))
    assert len(masks) == 2 * len(modules)  # one draw per adapter per module, in that order
    kept = torch.cat([m.flatten() for m in masks]).mean()
    assert abs(float(kept) - 0.4) < 0.05  # about `density` of the entries survive
    for index, (module, delta) in enumerate(compose.delta_weights(model, "d").items()):
        mx, my = masks[2 * index], masks[2 * index + 1]
        dx, dy = _deltas(factors, module)
        assert mx.shape == dx.shape and set(mx.unique().tolist()) <= {0.0, 1.0}
        rescaled = [mx * dx / 0.4, my * dy / 0.4]
        if how == "dare_linear_svd":
            expected = 0.6 * rescaled[0] + 0.9 * rescaled[1]
        else:
            expected = disjoint_mean(rescaled, [0.6, 0.9])
        torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-4)


def test_dare_is_unbiased(pair):
    """DARE's rescaling keeps the expected delta: the mean of many merges nears the exact sum."""
    model, factors = pair
    total = None
    draws = 60
    for i in range(draws):
        torch.manual_seed(100 + i)
        compose.combine(model, ["x", "y"], [0.5, 0.5], f"d{i}", how="dare_linear_svd",
                        density=0.5, svd_rank=32)  # fmt: skip
        delta = compose.delta_weights(model, f"d{i}")["model.layers.0.self_attn.q_proj"]
        total = delta if total is None else total + delta
    dx, dy = _deltas(factors, "model.layers.0.self_attn.q_proj")
    exact = 0.5 * dx + 0.5 * dy
    error = (total / draws - exact).norm() / exact.norm()
    assert error < 0.25  # a single draw is ~ 1.0 away (density 0.5); 60 draws ~ 1/sqrt(60)


def test_factor_forms_apply_the_operation_to_a_and_to_b(pair):
    model, factors = pair
    compose.combine(model, ["x", "y"], [0.6, 0.4], "f", how="ties", density=0.5)
    layer = dict(model.named_modules())["base_model.model.model.layers.1.self_attn.q_proj"]
    (bx, ax, sx), (by, ay, sy) = (
        factors["x"]["model.layers.1.self_attn.q_proj"],
        factors["y"]["model.layers.1.self_attn.q_proj"],
    )
    root = [math.sqrt(0.6 * sx), math.sqrt(0.4 * sy)]  # PEFT spreads w * s over both factors
    torch.testing.assert_close(layer.lora_A["f"].weight, ties([ax, ay], root, 0.5))
    torch.testing.assert_close(layer.lora_B["f"].weight, ties([bx, by], root, 0.5))
    on_deltas = ties([sx * bx @ ax, sy * by @ ay], [0.6, 0.4], 0.5)
    assert not torch.allclose(layer.lora_B["f"].weight @ layer.lora_A["f"].weight, on_deltas,
                              atol=1e-3)  # an approximation of TIES on the updates  # fmt: skip


def test_bad_combinations_are_refused(pair, tmp_path):
    model, _ = pair
    for density in (0.0, -0.2, 1.5, None):
        with pytest.raises(ConfigError, match=r"density in \(0, 1\]"):
            compose.combine(model, ["x", "y"], [1, 1], "n", how="dare_ties_svd", density=density)
    with pytest.raises(ConfigError, match="does not prune"):
        compose.combine(model, ["x", "y"], [1, 1], "n", how="cat", density=0.5)
    with pytest.raises(ConfigError, match="one weight per adapter"):
        compose.combine(model, ["x", "y"], [1, 1, 1], "n", how="cat")
    compose.add_adapter(model, "wide", _adapter(tmp_path / "wide", 5, rank=8))
    for how in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"):
        with pytest.raises(AdapterError, match="needs equal ranks"):
            compose.combine(model, ["x", "wide"], [1, 1], "n", how=how, density=0.5)
    compose.combine(model, ["x", "wide"], [1, 1], "cat_ok", how="cat")  # cat takes any ranks
    assert compose.adapter_names(model) == ["x", "y", "wide", "cat_ok"]
