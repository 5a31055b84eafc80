"""Child-Tuning F and D (contract rows in test_contract.py): exact masking under AdamW with weight
decay, one F mask per optimizer step under accumulation, drawn from the documented hash, the Fisher
pass, the exact top-p and the chosen subnetwork against independent computations, sparse saving,
optimizer memory, bad input, and Trainer use."""

import numpy as np
import pytest
import torch

import peftkit
from contract import batch_for, logits, tiny
from peftkit.errors import ConfigError, DataError
from peftkit.io import read_tensors
from peftkit.methods import child_tuning
from peftkit.methods.child_tuning import ChildTuningConfig, sparse_patch
from peftkit.methods.child_tuning import subnetwork as child_tuning_subnetwork
from peftkit.methods.child_tuning.masks import effective_ratio, keep_mask, keep_threshold


def optimizer_state_bytes(optimizer):
    return sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def effective_weights(model):
    """Every tensor as the model computes it, under its original (unpatched) name."""
    weights = {}
    for name, parameter in model.named_parameters():
        if name.endswith(".values"):
            continue
        if ".parametrizations." in name:
            module_name, rest = name.split(".parametrizations.")
            attribute = rest.split(".")[0]
            parameter = getattr(model.get_submodule(module_name), attribute)
            name = f"{module_name}.{attribute}"
        weights[name] = parameter.detach().clone()
    return weights


def test_f_masks_exactly_under_adamw_with_weight_decay():
    model, tokenizer = tiny("bert")
    batch = batch_for("bert", tokenizer)
    config = ChildTuningConfig(mode="F", reserve_ratio=0.3)
    model = peftkit.apply(model, config)
    # Masked around torch's own AdamW (the path of any optimizer ChildTuningAdamW cannot replace).
    optimizer = child_tuning.replace_optimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), one_pass=False
    )
    assert type(optimizer) is torch.optim.AdamW
    model.train()
    for _ in range(3):  # later steps carry momentum for entries outside their mask
        optimizer.zero_grad()
        model(**batch).loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
        masks = {n: m.clone() for n, m in child_tuning._state(model).masking.masks.items()}
        scale = 1 / effective_ratio(0.3)
        assert abs(1 / scale - 0.3) < 1 / 65536
        for name, parameter in model.named_parameters():  # AdamW stepped on these gradients
            expected = torch.where(masks[name], grads[name] * scale, 0.0)
            torch.testing.assert_close(parameter.grad, expected, atol=0, rtol=0)
        for name, parameter in model.named_parameters():
            keep = masks[name]
            assert torch.equal(parameter.detach()[~keep], before[name][~keep]), name
        moved = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
        kept = sum(int(m.sum()) for m in masks.values())
        assert moved > 0.9 * kept
        share = kept / sum(m.numel() for m in masks.values())
        assert abs(share - 0.3) < 0.02


def lowbias32_keep(numel: int, seed_hi: int, seed_lo: int, threshold: int) -> np.ndarray:
    """The documented F mask, written out in numpy uint32 arithmetic (which wraps mod 2^32):
    entry i kept when the top 16 bits of lowbias32((i ^ seed_hi) + seed_lo) are below threshold."""
    x = (np.arange(numel, dtype=np.uint32) ^ np.uint32(seed_hi)) + np.uint32(seed_lo)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return (x >> np.uint32(16)) < threshold


def test_f_draws_one_mask_per_optimizer_step_under_accumulation():
    model, tokenizer = tiny("gpt2")
    batch = batch_for("gpt2", tokenizer)
    config = ChildTuningConfig(mode="F", reserve_ratio=0.5)
    model = peftkit.apply(model, config)
    optimizer = child_tuning.hooks(model, config).replace_optimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.0)
    )
    model.train()
    for _ in range(2):  # two micro-batches accumulate into .grad before the step masks them
        model(**batch).loss.backward()
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.manual_seed(7)
    optimizer.step()
    torch.manual_seed(7)  # the same seeds, drawn independently: two per parameter, in order
    parameters = dict(model.named_parameters())
    seeds = torch.randint(0, 2**32, (len(parameters), 2), dtype=torch.int64).tolist()
    for (name, parameter), (high, low) in zip(parameters.items(), seeds, strict=True):
        keep = lowbias32_keep(parameter.numel(), high, low, 32768)  # p = 0.5 exactly
        keep = torch.from_numpy(keep).view(parameter.shape)
        torch.testing.assert_close(parameter.grad, torch.where(keep, accumulated[name] * 2, 0.0))


def test_fisher_is_the_mean_squared_gradient():
    model, tokenizer = tiny("bert")
    model.eval()
    torch.nn.Module.train(model, False)
    batches = [batch_for("bert", tokenizer)] * 2
    second = dict(batches[0], labels=torch.tensor([1, 0, 0]))
    batches = [batches[0], second]
    candidates = child_tuning_subnetwork.layer_parameters(model)
    for module in model.modules():  # no dropout, so an independent pass sees the same loss
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    fisher = child_tuning_subnetwork.fisher_information(model, candidates, batches)
    expected = {n: torch.zeros_like(p) for n, p in candidates.items()}
    for batch in batches:
        grads = torch.autograd.grad(model(**batch).loss, list(candidates.values()))
        for name, grad in zip(candidates, grads, strict=True):
            expected[name] += grad**2 / len(batches)
    for name in candidates:
        torch.testing.assert_close(fisher[name], expected[name])
    assert all(p.grad is None for p in model.parameters())


def test_top_k_is_exact_against_a_full_sort():
    torch.manual_seed(1)
    scores = {
        "a": torch.rand(50, 7),
        "b": torch.zeros(33),  # many exact ties at zero
        "c": (torch.rand(4, 4, 4) * 1e-30) ** 2,  # tiny and subnormal values
        "d": torch.randint(0, 3, (40,)).float(),  # ties at small integers
    }
    flat = torch.cat([s.flatten() for s in scores.values()])
    # Independent reference: a stable descending sort keeps earlier positions first among ties.
    order = torch.sort(flat, descending=True, stable=True).indices
    for k in (1, 17, 100, 200, 413, 450, flat.numel()):
        masks = child_tuning_subnetwork.top_k_masks(scores, k)
        chosen = torch.cat([m.flatten() for m in masks.values()])
        assert set(chosen.nonzero().flatten().tolist()) == set(order[:k].tolist()), k


def test_top_k_breaks_ties_by_position():
    scores = {"a": torch.tensor([0.0, 1.0, 0.0]), "b": torch.tensor([0.0, 2.0])}
    masks = child_tuning_subnetwork.top_k_masks(scores, 3)
    assert masks["a"].tolist() == [True, True, False] and masks["b"].tolist() == [False, True]


def prepared_d(family="bert", ratio=0.3):
    model, tokenizer = tiny(family)
    batch = batch_for(family, tokenizer)
    config = ChildTuningConfig(mode="D", reserve_ratio=ratio)
    model = peftkit.apply(model, config)
    child_tuning.hooks(model, config).prepare(model, [batch, batch])
    return model, batch


def test_d_keeps_the_top_p_of_the_layers_and_outputs_are_unchanged():
    model, tokenizer = tiny("bert")
    batch = batch_for("bert", tokenizer)
    reference = logits(model, batch)
    model, _ = prepared_d()
    torch.testing.assert_close(logits(model, batch), reference, atol=0, rtol=0)
    layers = sum(
        p.numel() for p in child_tuning_subnetwork.layer_parameters(tiny("bert")[0]).values()
    )
    kept = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".values"))
    assert kept == round(0.3 * layers)


def test_d_chooses_exactly_the_fisher_top_k_computed_independently():
    """The subnetwork prepare installs is the top k of the layers' Fisher information, computed
    here with plain autograd and torch.topk over all layer weights at once (issue 16, item 11)."""
    model, tokenizer = tiny("bert")
    for module in model.modules():  # no dropout, so both passes see the same losses
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    first = batch_for("bert", tokenizer)
    batches = [first, dict(first, labels=1 - first["labels"]), dict(first, labels=first["labels"])]
    layers = {n: p for n, p in model.named_parameters() if n.startswith("bert.encoder.layer.")}
    squares = {n: torch.zeros_like(p) for n, p in layers.items()}
    for batch in batches:
        grads = torch.autograd.grad(model(**batch).loss, list(layers.values()))
        for name, grad in zip(layers, grads, strict=True):
            squares[name] += grad * grad
    flat = torch.cat([(squares[n] / len(batches)).flatten() for n in layers])
    k = round(0.3 * flat.numel())
    top = torch.topk(flat, k)
    assert top.values[-1] > flat.sort(descending=True).values[k]  # no tie at the boundary
    offsets = dict(zip(layers, np.cumsum([0] + [p.numel() for p in layers.values()]), strict=False))

    config = ChildTuningConfig(mode="D", reserve_ratio=0.3)
    model = peftkit.apply(model, config)
    child_tuning.hooks(model, config).prepare(model, batches)
    chosen = set()
    for name, (module, attribute) in child_tuning._state(model).patched.items():
        indices = module.parametrizations[attribute][0].indices.long()
        chosen.update((indices + int(offsets[name])).tolist())
    assert chosen == set(top.indices.tolist())


def test_d_step_moves_only_the_subnetwork_and_state_scales_with_p():
    model, batch = prepared_d()
    before = effective_weights(model)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    after = effective_weights(model)
    state = child_tuning._state(model)
    for name, (module, attribute) in state.patched.items():
        outside = torch.ones(before[name].numel(), dtype=torch.bool)
        outside[module.parametrizations[attribute][0].indices.long()] = False
        assert torch.equal(after[name].flatten()[outside], before[name].flatten()[outside])
    assert any(not torch.equal(after[n], before[n]) for n in state.patched)

    full, _ = tiny("bert")
    full_optimizer = torch.optim.AdamW(full.parameters(), lr=1e-2)
    full(**batch).loss.backward()
    full_optimizer.step()
    ratio = optimizer_state_bytes(optimizer) / optimizer_state_bytes(full_optimizer)
    assert ratio <= 0.3 + 0.05


def test_d_file_holds_about_p_of_a_full_copy(tmp_path):
    model, batch = prepared_d()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    peftkit.save(model, tmp_path / "adapter")
    saved = read_tensors(tmp_path / "adapter")
    assert all(k.endswith((".values", ".bitmask", ".indices")) or "classifier" in k for k in saved)
    file_bytes = sum(t.nbytes for t in saved.values())
    full_bytes = sum(p.numel() * 4 for p in tiny("bert")[0].parameters())
    assert file_bytes <= 0.3 * full_bytes + 1024
    loaded = peftkit.load(tiny("bert")[0], tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=0, rtol=0)
    # Resuming from the adapter: prepare keeps the loaded subnetwork instead of choosing anew.
    child_tuning.hooks(loaded, child_tuning._state(loaded).config).prepare(loaded, [])
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=0, rtol=0)


def test_f_saves_changed_entries_and_reloads_exactly(tmp_path):
    model, tokenizer = tiny("llama")
    batch = batch_for("llama", tokenizer)
    config = ChildTuningConfig(mode="F", reserve_ratio=0.05)
    model = peftkit.apply(model, config)
    hooks = child_tuning.hooks(model, config)
    optimizer = hooks.replace_optimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    peftkit.save(model, tmp_path / "adapter")
    saved = read_tensors(tmp_path / "adapter")
    base = dict(tiny("llama")[0].named_parameters())
    changed = sum(int((p.detach() != base[n]).sum()) for n, p in model.named_parameters())
    stored = sum(t.numel() for k, t in saved.items() if k.endswith(".values"))
    assert changed <= stored <= 0.06 * sum(p.numel() for p in base.values())
    loaded = peftkit.load(tiny("llama")[0], tmp_path / "adapter")
    for name, parameter in loaded.named_parameters():
        assert torch.equal(parameter, dict(model.named_parameters())[name]), name


@pytest.mark.parametrize(
    ("ratio", "steps", "kind"),
    # (0.5, 8): after 8 steps nearly every entry has changed, so tensors stop being tracked and
    # are saved whole; the reload must still be exact.
    [(0.005, 1, ".indices"), (0.2, 1, ".bitmask"), (1.0, 1, "dense"), (0.5, 8, "dense")],
)
def test_f_patch_encodings_reload_exactly(ratio, steps, kind, tmp_path):
    model, tokenizer = tiny("gpt2")
    batch = batch_for("gpt2", tokenizer)
    config = ChildTuningConfig(mode="F", reserve_ratio=ratio)
    model = peftkit.apply(model, config)
    hooks = child_tuning.hooks(model, config)
    optimizer = hooks.replace_optimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    model.train()
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if steps > 1:
        assert child_tuning._state(model).masking.saved_whole  # the untracked path was taken
    peftkit.save(model, tmp_path / "adapter")
    saved = read_tensors(tmp_path / "adapter")
    names = dict(model.named_parameters())
    found = {k for k in saved if k.endswith(kind)} if kind != "dense" else set(saved) & set(names)
    assert found, sorted(saved)
    loaded = peftkit.load(tiny("gpt2")[0], tmp_path / "adapter")
    for name, parameter in loaded.named_parameters():
        assert torch.equal(parameter, names[name]), name


def draw_mask(numel: int, ratio: float, seeds: tuple[int, int]) -> torch.Tensor:
    """F's mask of a tensor of `numel` entries, drawn by the torch path."""
    keep = torch.empty(numel, dtype=torch.bool)
    scratch = torch.empty(2 * numel, dtype=torch.int64)
    return keep_mask(0, seeds, keep_threshold(ratio), keep, scratch)


def test_keep_mask_keeps_p_on_average_and_is_the_documented_hash():
    keep = draw_mask(10**6, 0.3, (12345, 678910))
    assert abs(float(keep.float().mean()) - 0.3) < 0.002  # 4.6 standard deviations
    tiny_share = draw_mask(10**6, 1e-9, (1, 2))
    assert 0 < int(tiny_share.sum()) < 100  # never zero probability (p rounds up to 1/65536)
    for seeds in ((0, 0), (2**32 - 1, 2**32 - 1), (3_000_000_000, 123)):  # wrap-around sums
        expected = lowbias32_keep(5000, *seeds, keep_threshold(0.3))
        assert torch.equal(draw_mask(5000, 0.3, seeds), torch.from_numpy(expected))


def test_bit_packing_round_trips():
    mask = torch.rand(1001) < 0.3
    packed = sparse_patch.pack_bits(mask)
    assert packed.numel() == 126 and packed.dtype == torch.uint8
    assert torch.equal(sparse_patch.unpack_bits(packed, 1001), mask)


def test_merge_returns_the_plain_model():
    model, batch = prepared_d("llama")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    tuned = logits(model, batch)
    merged = peftkit.merge(model)
    assert not any("parametrizations" in n for n, _ in merged.named_parameters())
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(merged, batch), tuned, atol=0, rtol=0)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_reserve_ratio_outside_0_1_is_refused(ratio):
    with pytest.raises(ConfigError, match="reserve_ratio"):
        peftkit.config_for("child_tuning", reserve_ratio=ratio)


def test_unknown_mode_is_refused():
    with pytest.raises(ConfigError, match="mode"):
        ChildTuningConfig(mode="E")


def test_fisher_pass_over_no_batches_is_refused():
    model, _ = tiny("bert")
    config = ChildTuningConfig()
    model = peftkit.apply(model, config)
    with pytest.raises(DataError, match="no batches"):
        child_tuning.hooks(model, config).prepare(model, [])


def test_fisher_pass_without_labels_is_refused():
    model, tokenizer = tiny("bert")
    batch = batch_for("bert", tokenizer)
    del batch["labels"]
    config = ChildTuningConfig()
    model = peftkit.apply(model, config)
    with pytest.raises(DataError, match="labels"):
        child_tuning.hooks(model, config).prepare(model, [batch])


@pytest.mark.parametrize("mode", ["F", "D"])
def test_works_inside_a_transformers_trainer(mode, tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, tokenizer = tiny("bert")
    batch = batch_for("bert", tokenizer)

    class Repeat(Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, index):
            return {k: v[index % 3] for k, v in batch.items()}

    config = ChildTuningConfig(mode=mode)
    model = peftkit.apply(model, config)
    hooks = child_tuning.hooks(model, config)
    if hooks.prepare:
        hooks.prepare(model, [batch])  # before the Trainer builds its optimizer
    optimizer = None  # F: the masking optimizer, built from the one the Trainer would build
    if hooks.replace_optimizer:
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        optimizer = hooks.replace_optimizer(model, adamw)
    base = dict(tiny("bert")[0].named_parameters())
    calls = []

    class Hooks(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            calls.append("before")
            if hooks.before_optimizer_step:
                hooks.before_optimizer_step(kwargs["model"], state.global_step)

        def on_optimizer_step(self, args, state, control, **kwargs):
            calls.append("after")
            if hooks.after_optimizer_step:
                hooks.after_optimizer_step(kwargs["model"], state.global_step)

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=3,
        gradient_accumulation_steps=2, learning_rate=1e-2, weight_decay=0.1,
        report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no",
    )  # fmt: skip
    Trainer(
        model=model, args=args, train_dataset=Repeat(), callbacks=[Hooks()],
        optimizers=(optimizer, None),
    ).train()  # fmt: skip
    assert calls == ["before", "after"] * 2  # once per optimizer step, not per micro-batch
    after = effective_weights(model)
    changed = sum(int((after[n] != base[n]).sum()) for n in base if n in after)
    total = sum(p.numel() for p in base.values())
    assert 0 < changed <= (0.3 if mode == "D" else 1 - 0.7**2 + 0.02) * total
