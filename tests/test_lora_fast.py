"""peftkit's fast LoRA forward against PEFT's own LoRA modules: equal outputs and gradients with
dropout 0 on every family, exact gradients for the shared dropout masks, PEFT's forward wherever
the fast path does not apply."""

import copy

import peft
import pytest
import torch

import peftkit
from contract import FAMILIES, batch_for, tiny
from peftkit.methods import lora
from peftkit.methods.lora import down as lora_fast_down
from peftkit.methods.lora import fast as lora_fast

CONFIGS = {
    "lora-all-linear": peftkit.LoraConfig(rank=4, dropout=0.0, target_modules="all-linear"),
    "rslora": peftkit.RsLoraConfig(rank=4, dropout=0.0),
    "dora-all-linear": peftkit.DoraConfig(rank=4, dropout=0.0, target_modules="all-linear"),
}


def _pair(family, config, dtype=torch.float32):
    """peftkit's model and PEFT's own on the same base, with the same non-zero adapter weights."""
    base, tokenizer = tiny(family)
    base = base.to(dtype)
    fast = peftkit.apply(copy.deepcopy(base), config)
    reference = peft.get_peft_model(base, lora.peft_config(base, config))
    torch.manual_seed(1)
    with torch.no_grad():
        for (name, mine), (_, theirs) in zip(
            fast.named_parameters(), reference.named_parameters(), strict=True
        ):
            if "lora_B" in name:
                theirs.normal_(std=0.3)
            mine.copy_(theirs)
    return fast, reference, batch_for(family, tokenizer)


def _step(model, batch, seed=0):
    """Logits and the gradient of every trainable parameter, after one training forward."""
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)  # the models' own dropout draws alike in both
    output = model(**batch)
    output.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return output.logits.detach(), grads


class _CountPeftForward:
    """Counts calls of PEFT's own LoRA Linear forward."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = peft.tuners.lora.Linear.forward

        def counted(layer, *args, **kwargs):
            self.calls += 1
            return original(layer, *args, **kwargs)

        monkeypatch.setattr(peft.tuners.lora.Linear, "forward", counted)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_equals_peft_forward_and_gradients(family, config, monkeypatch):
    # float64, so that the comparison sees the maths, not the summation order of float32
    fast, reference, batch = _pair(family, config, torch.float64)
    expected = _step(reference, batch)
    first = _step(fast, batch)  # the first forward also finds the sibling layers
    counter = _CountPeftForward(monkeypatch)
    second = _step(fast, batch)
    assert counter.calls == 0, "PEFT's forward ran: the fast path did not apply"
    for logits, grads in (first, second):
        torch.testing.assert_close(logits, expected[0], atol=1e-9, rtol=0)
        for name, grad in expected[1].items():
            torch.testing.assert_close(grads[name], grad, atol=1e-9, rtol=0, msg=name)
    groups = {id(g) for m in fast.modules() if (g := getattr(m, lora_fast._SIBLINGS, None))}
    if family != "gpt2":  # GPT-2's q/k/v are one Conv1D already; every other family has siblings
        assert groups


def test_equals_peft_in_float32_within_1e5():
    # float32 sums in another order: within 1e-5 of PEFT's, absolute or relative to the value
    fast, reference, batch = _pair("llama", CONFIGS["lora-all-linear"])
    expected = _step(reference, batch)
    for _ in range(2):
        logits, grads = _step(fast, batch)
        torch.testing.assert_close(logits, expected[0], atol=1e-5, rtol=1e-5)
        for name, grad in expected[1].items():
            torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_keep_mask_rate_per_lane():
    torch.manual_seed(0)
    p, count = 0.05, 1 << 20
    keep = lora_fast_down.keep_mask(torch.Size([count]), p, torch.device("cpu"))
    dropped = (~keep).double()
    rate = lora_fast_down.drop_count(p) / lora_fast_down.LANES
    assert abs(rate - p) < 1 / lora_fast_down.LANES
    sigma = (rate * (1 - rate) / (count / 4)) ** 0.5
    for lane in range(4):  # each 16-bit lane of a 64-bit word drops at the same rate
        assert abs(dropped[lane::4].mean().item() - rate) < 5 * sigma
    # neighbouring elements are independent: P(both dropped) = rate^2
    both = (dropped[:-1] * dropped[1:]).mean().item()
    assert abs(both - rate**2) < 5 * (rate**2 / (count - 1)) ** 0.5


def test_siblings_share_one_mask_and_gradients_are_exact(monkeypatch):
    base, tokenizer = tiny("llama")
    config = peftkit.LoraConfig(rank=4, dropout=0.25, target_modules="all-linear")
    model = peftkit.apply(base, config)
    model.train()
    _find_siblings(model, batch_for("llama", tokenizer))
    attention = model.base_model.model.model.layers[0].self_attn
    layers = [attention.q_proj, attention.k_proj, attention.v_proj]
    masks = []
    drawn = lora_fast_down.keep_mask
    monkeypatch.setattr(
        lora_fast_down, "keep_mask", lambda *a: masks.append(drawn(*a)) or masks[-1]
    )
    with torch.no_grad():
        for layer in layers:
            layer.lora_B["default"].weight.normal_()
    x = torch.randn(2, 5, 32, requires_grad=True)
    weights = [torch.randn(2, 5, layer.out_features) for layer in layers]
    sum((layer(x) * w).sum() for layer, w in zip(layers, weights, strict=True)).backward()
    assert len(masks) == 1, "q, k and v read one input: one mask"
    fast_grads = [x.grad] + [p.grad for layer in layers for p in _adapter_weights(layer)]

    # The same maths written out with the recorded mask, differentiated by autograd.
    x_ref = x.detach().clone().requires_grad_(True)
    keep = 1 - lora_fast_down.drop_count(0.25) / lora_fast_down.LANES
    dropped = x_ref * masks[0].view(2, 5, 32) / keep
    ref_weights = [[p.detach().clone().requires_grad_(True) for p in _adapter_weights(layer)]
                   for layer in layers]  # fmt: skip
    total = 0
    for layer, (a, b), w in zip(layers, ref_weights, weights, strict=True):
        out = layer.base_layer(x_ref) + (dropped @ a.T) @ b.T * layer.scaling["default"]
        total = total + (out * w).sum()
    total.backward()
    ref_grads = [x_ref.grad] + [p.grad for pair in ref_weights for p in pair]
    for got, want in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _find_siblings(model, batch):
    """Two forwards: the first records which layers read one tensor, the second groups them."""
    with torch.no_grad():
        model(**batch)
        model(**batch)


def _adapter_weights(layer):
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def _saved_bytes(model, batch):
    """Bytes of the distinct activation storages autograd saves for backward (weights aside)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return sum(storages.values())


def test_dropout_saves_bool_masks_only_and_nothing_without_dropout():
    base, tokenizer = tiny("llama")
    batch = batch_for("llama", tokenizer)
    tokens = batch["input_ids"].numel()
    saved = {}
    for dropout in (0.0, 0.1):
        config = peftkit.LoraConfig(dropout=dropout, target_modules="all-linear")
        fast = peftkit.apply(copy.deepcopy(base), config)
        fast.train()
        _find_siblings(fast, batch)
        theirs = peft.get_peft_model(copy.deepcopy(base), lora.peft_config(base, config))
        saved[dropout] = (_saved_bytes(fast, batch), _saved_bytes(theirs, batch))
    # Per layer, 4 inputs feed adapters: q/k/v's (hidden 32), o's (32), gate/up's (32), down's (64).
    shared_inputs = 2 * tokens * (32 + 32 + 32 + 64)
    # Without dropout the siblings' A matrices run as one linear over their concatenation, which
    # autograd keeps for the input's gradient (rank 8 x 32 float32 values per sibling): gate/up's
    # in both layers, q/k/v's in the second only (the first layer's input needs no gradient).
    concatenated_a = (2 * 2 + 3) * 8 * 32 * 4
    # With dropout: one bool per element of each shared input, the A parameters themselves kept.
    assert saved[0.1][0] - saved[0.0][0] == shared_inputs - concatenated_a
    # PEFT: at least the dropped float copy of each of the 7 layers' inputs (and its mask)
    per_layer_inputs = 2 * tokens * (6 * 32 + 64)
    assert saved[0.1][1] - saved[0.0][1] >= 4 * per_layer_inputs
    assert saved[0.0][0] <= saved[0.0][1] + concatenated_a  # PEFT keeps the A parameters only


def test_falls_back_to_peft_where_the_fast_path_does_not_apply(monkeypatch):
    fast, reference, batch = _pair("llama", CONFIGS["lora-all-linear"])
    for model in (fast, reference):
        model.eval()
    _find_siblings(fast, batch)
    with torch.no_grad():
        counter = _CountPeftForward(monkeypatch)
        for model in (fast, reference):
            model.merge_adapter()
        torch.testing.assert_close(fast(**batch).logits, reference(**batch).logits)
        for model in (fast, reference):
            model.unmerge_adapter()
        with fast.disable_adapter(), reference.disable_adapter():
            torch.testing.assert_close(fast(**batch).logits, reference(**batch).logits)
        names = ["default", "__base__", "default"]
        torch.testing.assert_close(
            fast(**batch, adapter_names=names).logits,
            reference(**batch, adapter_names=names).logits,
        )
        assert counter.calls >= 3 * 2 * 14  # merged, disabled, mixed: PEFT's forward, both models
        # Sibling layers called with different tensors: each computes its own, correctly.
        attention = fast.base_model.model.model.layers[0].self_attn
        peer = reference.base_model.model.model.layers[0].self_attn
        x, y = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
        for a, b in ((x, x), (x, y), (y, y)):
            torch.testing.assert_close(attention.q_proj(a), peer.q_proj(a))
            torch.testing.assert_close(attention.k_proj(b), peer.k_proj(b))


def test_gradient_checkpointing_redraws_the_same_masks():
    base, tokenizer = tiny("llama")
    batch = batch_for("llama", tokenizer)
    config = peftkit.LoraConfig(dropout=0.2, target_modules="all-linear")
    plain = peftkit.apply(copy.deepcopy(base), config)
    checkpointed = peftkit.apply(base, config)
    checkpointed.gradient_checkpointing_enable({"use_reentrant": False})
    with torch.no_grad():
        for p, q in zip(plain.parameters(), checkpointed.parameters(), strict=True):
            if p.requires_grad:
                p.normal_(std=0.3)
                q.copy_(p)
    for _ in range(2):  # the first forward finds the siblings, the second shares
        want = _step(plain, batch, seed=3)
        got = _step(checkpointed, batch, seed=3)
        torch.testing.assert_close(got[0], want[0])
        for name, grad in want[1].items():
            torch.testing.assert_close(got[1][name], grad, msg=name)


def test_first_forward_draws_the_masks_of_later_forwards():
    # A run resumed from a checkpoint starts on a fresh model, whose first forward is still finding
    # the sibling layers: it must draw the masks the uninterrupted run's model draws by then.
    base, tokenizer = tiny("llama")
    base = base.double()
    batch = batch_for("llama", tokenizer)
    config = peftkit.LoraConfig(dropout=0.2, target_modules="all-linear")
    fresh = peftkit.apply(copy.deepcopy(base), config)
    grouped = peftkit.apply(base, config)
    with torch.no_grad():
        for p, q in zip(fresh.parameters(), grouped.parameters(), strict=True):
            if p.requires_grad:
                p.normal_(std=0.3)
                q.copy_(p)
    grouped.eval()  # no dropout: finding the siblings draws nothing
    _find_siblings(grouped, batch)
    assert any(hasattr(m, lora_fast._SIBLINGS) for m in grouped.modules())
    assert not any(hasattr(m, lora_fast._SIBLINGS) for m in fresh.modules())
    want = _step(grouped, batch, seed=5)
    got = _step(fresh, batch, seed=5)
    torch.testing.assert_close(got[0], want[0], atol=1e-9, rtol=0)
    for name, grad in want[1].items():
        torch.testing.assert_close(got[1][name], grad, atol=1e-9, rtol=0, msg=name)


def _relative_error(got, want):
    return ((got.float() - want).norm() / want.norm()).item()


def test_bf16_autocast_no_less_accurate_than_peft():
    fast, reference, batch = _pair("llama", CONFIGS["lora-all-linear"])
    exact = _step(reference, batch)  # float32: the reference both bf16 runs are held to
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = _step(reference, batch)
        for _ in range(2):
            mine = _step(fast, batch)
            for got, want, peft_result in zip(
                mine[1].values(), exact[1].values(), theirs[1].values(), strict=True
            ):
                assert got.dtype == torch.float32
                assert _relative_error(got, want) <= 1.5 * _relative_error(peft_result, want) + 1e-3
            assert (
                _relative_error(mine[0], exact[0])
                <= 1.5 * _relative_error(theirs[0], exact[0]) + 1e-3
            )
    fast_dropout = peftkit.apply(tiny("llama")[0], peftkit.LoraConfig(dropout=0.1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            _, grads = _step(fast_dropout, batch)
            assert all(torch.isfinite(g).all() for g in grads.values())


def test_fast_path_off_is_peft_forward_and_remove_unhooks():
    base, _ = tiny("llama")
    model = peftkit.apply(base, peftkit.LoraConfig(fast_path=False))
    assert not any("forward" in m.__dict__ for m in model.modules())
    fast = peftkit.apply(tiny("llama")[0], peftkit.LoraConfig())
    layers = [m for m in fast.modules() if isinstance(m, peft.tuners.lora.Linear)]
    assert layers and all("forward" in m.__dict__ for m in layers)
    restored = lora.remove(fast)
    assert not any(isinstance(m, peft.tuners.lora.Linear) for m in restored.modules())
    assert not restored._forward_hooks and not restored._forward_pre_hooks
