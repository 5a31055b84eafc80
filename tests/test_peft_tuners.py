"""LoHa, LoKr, VeRA and OFT (PEFT tuners behind peftkit records): each adapted layer against the
paper's formula written out here, their trainable counts in closed form, their refusals, and
adapters written by PEFT itself loaded by peftkit. The shared contract is in test_contract.py."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn.functional as F

import peftkit
from contract import batch_for, logits, tiny
from peftkit.errors import TargetError

Q_PROJ = "model.layers.0.self_attn.q_proj"
V_PROJ = "model.layers.0.self_attn.v_proj"


def randomize(model: torch.nn.Module, scale: float = 0.3) -> None:
    """Give every trainable parameter random values (init leaves some at zero)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))


def layer(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The PEFT layer wrapping the base module `name` of an applied causal LM."""
    return model.get_submodule(f"base_model.model.{name}")


def adapter_tensors(wrapped: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A PEFT layer's adapter tensors whose names start with `prefix`, by name."""
    children = wrapped.named_children()
    return {k: v["default"] for k, v in children if k.startswith(prefix) and "default" in v}


def check_layer(wrapped: torch.nn.Module, delta: torch.Tensor) -> None:
    """The wrapped layer's output equals the base layer's with weight W + delta."""
    base = wrapped.get_base_layer()
    x = torch.randn(3, base.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = F.linear(x, base.weight + delta, base.bias)
        torch.testing.assert_close(wrapped(x), expected, atol=1e-5, rtol=1e-5)


def test_loha_is_a_hadamard_product_of_two_low_rank_products():
    tuned = peftkit.apply(tiny("llama")[0], peftkit.LoHaConfig(rank=4, alpha=6.0))
    randomize(tuned)
    for name in (Q_PROJ, V_PROJ):
        p = adapter_tensors(layer(tuned, name), "hada_")
        delta = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"]) * 6.0 / 4
        check_layer(layer(tuned, name), delta)
    # 2 r (d_in + d_out) per matrix: q 32 -> 32, v 32 -> 16 (grouped-query attention), 2 layers.
    assert peftkit.summary(tuned).trainable == 2 * (2 * 4 * (32 + 32) + 2 * 4 * (32 + 16))


def test_lokr_is_a_kronecker_product():
    tuned = peftkit.apply(tiny("llama")[0], peftkit.LoKrConfig(rank=2, alpha=4.0))
    randomize(tuned)
    for name in (Q_PROJ, V_PROJ):
        p = adapter_tensors(layer(tuned, name), "lokr_")
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        delta = torch.kron(p["lokr_w1"], w2) * 4.0 / 2
        assert delta.shape == layer(tuned, name).get_base_layer().weight.shape
        check_layer(layer(tuned, name), delta)


def test_vera_shares_frozen_random_matrices_and_trains_two_vectors_per_layer():
    config = peftkit.VeraConfig(rank=8, target_modules=["q_proj", "v_proj", "down_proj"])
    tuned = peftkit.apply(tiny("llama")[0], config)
    randomize(tuned)
    shared_a, shared_b = tuned.base_model.vera_A["default"], tuned.base_model.vera_B["default"]
    assert not any(t.requires_grad for t in (shared_a, shared_b))
    # One pair at the largest shape (in 64 from down_proj, out 32), sliced for each layer.
    assert shared_a.shape == (8, 64) and shared_b.shape == (32, 8)
    for name in (Q_PROJ, V_PROJ, "model.layers.1.mlp.down_proj"):
        wrapped = layer(tuned, name)
        base = wrapped.get_base_layer()
        assert wrapped.vera_A["default"] is shared_a  # the same tensor in every layer
        d, b = wrapped.vera_lambda_d["default"], wrapped.vera_lambda_b["default"]
        a_part = shared_a[:, : base.in_features]
        b_part = shared_b[: base.out_features]
        check_layer(wrapped, b[:, None] * (b_part @ (d[:, None] * a_part)))
    # r + d_out per layer: q (8 + 32), v (8 + 16), down (8 + 32); two layers.
    assert peftkit.summary(tuned).trainable == 2 * ((8 + 32) + (8 + 16) + (8 + 32))


# PEFT warns that a generator may differ across devices; here the same machine redraws them.
@pytest.mark.filterwarnings("ignore:Specified to not:UserWarning")
def test_vera_without_saved_projections_redraws_them_from_the_seed(tmp_path):
    model, tokenizer = tiny("llama")
    batch = batch_for("llama", tokenizer)
    tuned = peftkit.apply(model, peftkit.VeraConfig(rank=8, save_projection=False))
    randomize(tuned)
    expected = logits(tuned, batch)
    peftkit.save(tuned, tmp_path / "vera")
    saved = peft.utils.load_peft_weights(str(tmp_path / "vera"))
    assert not any("vera_A" in key or "vera_B" in key for key in saved)
    loaded = peftkit.load(tiny("llama")[0], tmp_path / "vera")
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-6, rtol=0)


def test_oft_rotations_keep_the_angles_between_neurons():
    """With the exact Cayley transform R is orthogonal and block-diagonal, so the merged
    W R^T keeps every row's norm and every angle between rows (the paper's hyperspherical
    energy): W' W'^T = W W^T."""
    config = peftkit.OFTConfig(block_size=8, use_cayley_neumann=False)
    model, _ = tiny("llama")
    weights = {name: model.get_submodule(name).weight.detach() for name in (Q_PROJ, V_PROJ)}
    gram = {name: weight @ weight.T for name, weight in weights.items()}
    tuned = peftkit.apply(model, config)
    # in_features (b - 1) / 2 per layer: q and v both read the 32-wide hidden state; 2 layers.
    assert peftkit.summary(tuned).trainable == 2 * 2 * 32 * 7 // 2
    randomize(tuned, scale=0.5)
    for name in (Q_PROJ, V_PROJ):
        rotation = layer(tuned, name).get_delta_weight("default").detach()
        torch.testing.assert_close(rotation.T @ rotation, torch.eye(32), atol=1e-5, rtol=0)
        blocks = torch.block_diag(*[torch.ones(8, 8)] * 4)
        assert not rotation[blocks == 0].any(), "R must be block-diagonal"
    merged = peftkit.merge(tuned)
    for name in (Q_PROJ, V_PROJ):
        weight = merged.get_submodule(name).weight.detach()
        torch.testing.assert_close(weight @ weight.T, gram[name], atol=1e-4, rtol=1e-4)


def test_oft_refuses_a_block_size_that_does_not_divide_the_inputs():
    model, _ = tiny("llama")
    with pytest.raises(TargetError, match=r"block_size 12 .*: 2, 4, 8, 16, 32\."):
        peftkit.apply(model, peftkit.OFTConfig(block_size=12))


PEFT_WRITTEN = {
    "ia3": peft.IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]
    ),
    "loha": peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "lokr": peft.LoKrConfig(r=2, alpha=2, target_modules=["q_proj", "o_proj"]),
    "vera": peft.VeraConfig(r=16, target_modules=["q_proj", "v_proj"]),
    "oft": peft.OFTConfig(oft_block_size=16, target_modules=["v_proj", "up_proj"]),
}


@pytest.mark.parametrize("name", PEFT_WRITTEN)
def test_peftkit_loads_adapters_written_by_peft(name, tmp_path):
    model, tokenizer = tiny("llama")
    batch = batch_for("llama", tokenizer)
    written = peft.get_peft_model(model, PEFT_WRITTEN[name])
    randomize(written, scale=0.1)
    expected = logits(written, batch)
    written.save_pretrained(tmp_path / name)
    loaded = peftkit.load(tiny("llama")[0], tmp_path / name)
    assert peftkit.api.applied(loaded).method.name == name
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=0)
    assert (expected - logits(tiny("llama")[0], batch)).abs().max() > 1e-3
