"""Child-Tuning F's one-pass AdamW: the same steps as masking around torch's AdamW, exact masking
with weight decay, interchangeable optimizer state, when it replaces the optimizer, and the one
random stream: the compiled kernel and the torch path draw the same masks from the same seeds."""

import copy

import pytest
import torch
from transformers import TrainingArguments

import peftkit
from contract import batch_for, tiny
from peftkit.methods import child_tuning
from peftkit.methods.child_tuning import ChildTuningConfig, replace_optimizer
from peftkit.methods.child_tuning import kernel as child_tuning_kernel
from peftkit.methods.child_tuning.adamw import ChildTuningAdamW
from peftkit.methods.child_tuning.masks import (
    effective_ratio,
    keep_mask,
    keep_threshold,
    step_seeds,
)
from peftkit.training.trainer import HooksCallback, PeftkitTrainer


def _f_model(ratio: float = 0.3, family: str = "gpt2"):
    model, tokenizer = tiny(family)
    return peftkit.apply(model, ChildTuningConfig(mode="F", reserve_ratio=ratio)), tokenizer


def _masks(model) -> dict[str, torch.Tensor]:
    """This step's F masks, copied."""
    return {n: m.clone() for n, m in child_tuning._state(model).masking.masks.items()}


def _steps(model, optimizer, batch, count: int) -> list[dict[str, torch.Tensor]]:
    """Train count steps (the optimizer masks) and return each step's masks."""
    masks = []
    model.train()
    for step in range(count):
        optimizer.zero_grad()
        torch.manual_seed(step)  # the same dropout in both runs
        model(**batch).loss.backward()
        torch.manual_seed(100 + step)  # the same mask draws
        optimizer.step()
        masks.append(_masks(model))
    return masks


@pytest.fixture
def chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunked torch step instead of the compiled loop (the path for GPUs and bf16)."""
    monkeypatch.setattr(child_tuning_kernel, "available", lambda parameter: False)


def test_one_pass_step_equals_masking_around_torch_adamw(chunked):
    """Same gradients, same draws: weights, masks and moments agree with masking around AdamW."""
    reference, tokenizer = _f_model()
    fused = copy.deepcopy(reference)
    batch = batch_for("gpt2", tokenizer)
    settings = {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.9, 0.99), "eps": 1e-6}
    plain = torch.optim.AdamW(reference.parameters(), **settings)
    plain = replace_optimizer(reference, plain, one_pass=False)  # torch's AdamW, masked around
    one_pass = replace_optimizer(fused, torch.optim.AdamW(fused.parameters(), **settings))
    assert isinstance(one_pass, ChildTuningAdamW) and type(plain) is torch.optim.AdamW
    paths = ((reference, plain), (fused, one_pass))
    reference.train()
    for step in range(4):  # later steps carry momentum for entries outside their mask
        plain.zero_grad()
        reference(**batch).loss.backward()
        # The fused model gets the reference's gradients: only the optimizer steps differ.
        for mine, theirs in zip(fused.parameters(), reference.parameters(), strict=True):
            mine.grad = theirs.grad.clone()
        masks = []
        for model, optimizer in paths:
            torch.manual_seed(100 + step)  # the same mask draws
            optimizer.step()
            masks.append(_masks(model))
        assert masks[0].keys() == masks[1].keys()
        for name, mask in masks[0].items():
            assert torch.equal(masks[1][name], mask), name
        named = dict(fused.named_parameters())
        for name, parameter in reference.named_parameters():
            # AdamW's update rounded in another order: an ulp or two per step.
            torch.testing.assert_close(named[name], parameter, rtol=1e-6, atol=1e-7)
            ours, theirs = one_pass.state[named[name]], plain.state[parameter]
            torch.testing.assert_close(ours["exp_avg"], theirs["exp_avg"], rtol=0, atol=0)
            torch.testing.assert_close(ours["exp_avg_sq"], theirs["exp_avg_sq"], rtol=0, atol=0)
    # The same entries are recorded as changed, so both save the same patch layout.
    assert child_tuning.layout(fused) == child_tuning.layout(reference)


def test_one_pass_step_leaves_entries_outside_the_mask_exactly():
    model, tokenizer = _f_model(0.3, "bert")
    batch = batch_for("bert", tokenizer)
    hooks = child_tuning.hooks(model, child_tuning._state(model).config)
    assert not hooks.before_optimizer_step and not hooks.after_optimizer_step  # all in the step
    optimizer = hooks.replace_optimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    )
    model.train()
    for _ in range(3):  # later steps carry momentum for entries outside their mask
        optimizer.zero_grad()
        model(**batch).loss.backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
        masks = child_tuning._state(model).masking.masks
        for name, parameter in model.named_parameters():
            keep = masks[name]
            assert torch.equal(parameter.detach()[~keep], before[name][~keep]), name
        kept = sum(int(m.sum()) for m in masks.values())
        moved = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
        assert moved > 0.9 * kept
        assert abs(kept / sum(m.numel() for m in masks.values()) - 0.3) < 0.02


def test_optimizer_state_interchanges_with_torch_adamw():
    """A checkpoint written by one loads into the other (resuming either way keeps the moments)."""
    model, tokenizer = _f_model()
    batch = batch_for("gpt2", tokenizer)
    optimizer = replace_optimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    _steps(model, optimizer, batch, 2)
    saved = optimizer.state_dict()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    plain.load_state_dict(saved)
    first = next(iter(model.parameters()))
    assert torch.equal(plain.state[first]["exp_avg"], optimizer.state[first]["exp_avg"])
    assert float(plain.state[first]["step"]) == 2.0
    again = replace_optimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    again.load_state_dict(plain.state_dict())
    assert torch.equal(again.state[first]["exp_avg_sq"], optimizer.state[first]["exp_avg_sq"])


@pytest.mark.parametrize(
    "make",
    [
        lambda params: torch.optim.SGD(params, lr=0.1),
        lambda params: torch.optim.AdamW(params, lr=0.1, amsgrad=True),
        lambda params: torch.optim.Adam(params, lr=0.1),
    ],
)
def test_other_optimizers_are_kept_and_masked_around_their_step(make):
    model, tokenizer = _f_model()
    optimizer = make(model.parameters())
    assert replace_optimizer(model, optimizer) is optimizer
    assert not isinstance(optimizer, ChildTuningAdamW)
    batch = batch_for("gpt2", tokenizer)
    model.train()
    model(**batch).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    scale = 1 / effective_ratio(0.3)
    for name, parameter in model.named_parameters():
        keep = child_tuning._state(model).masking.masks[name]
        assert torch.equal(parameter.detach()[~keep], before[name][~keep]), name
        assert torch.equal(parameter.grad, torch.where(keep, grads[name] * scale, 0.0)), name


def test_full_keep_ratio_and_mode_d_keep_torch_adamw():
    for config in (ChildTuningConfig(mode="F", reserve_ratio=1.0), ChildTuningConfig(mode="D")):
        model = peftkit.apply(tiny("gpt2")[0], config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        assert replace_optimizer(model, optimizer) is optimizer


def test_trainer_builds_the_one_pass_optimizer_with_its_parameter_groups(tmp_path):
    """PeftkitTrainer asks the method: Trainer's AdamW (decay and no-decay groups) is replaced by
    ChildTuningAdamW over the same groups, and training through it masks as it should."""
    model, tokenizer = _f_model(0.3, "gpt2")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    hooks = child_tuning.hooks(model, child_tuning._state(model).config)
    text = batch_for("gpt2", tokenizer)
    features = [
        {"input_ids": text["input_ids"][i % 2], "labels": text["input_ids"][i % 2]}
        for i in range(8)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
        learning_rate=1e-2, weight_decay=0.1, report_to="none", use_cpu=True,
        save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = PeftkitTrainer(
        model=model, args=args, train_dataset=features, callbacks=[HooksCallback(hooks)],
        hooks=hooks,
    )  # fmt: skip
    trainer.train()
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper around it
    assert isinstance(optimizer, ChildTuningAdamW)
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.1]
    masks = child_tuning._state(model).masking.masks
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter.detach()[~masks[name]], base[name][~masks[name]]), name
    changed = sum(int((p.detach() != base[n]).sum()) for n, p in model.named_parameters())
    assert 0.25 < changed / sum(p.numel() for p in base.values()) < 0.31


def _hyper(lr: float, weight_decay: float, step: int) -> dict[str, float]:
    """The compiled step's settings at p = 0.3, as ChildTuningAdamW builds them."""
    return {"threshold": keep_threshold(0.3), "lr": lr,
            "weight_decay": weight_decay, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
            "step": step, "scale": 1 / effective_ratio(0.3)}  # fmt: skip


def _adamw_reference(weight, grad, exp_avg, exp_avg_sq, keep, step, hyper):
    """AdamW on the kept entries (masked gradient scaled by 1/p), written out in torch ops."""
    g = torch.where(keep, grad * hyper["scale"], 0.0)
    m = exp_avg + (1 - hyper["beta1"]) * (g - exp_avg)
    v = exp_avg_sq * hyper["beta2"] + (1 - hyper["beta2"]) * g * g
    denom = (v.sqrt() / (1 - hyper["beta2"] ** step) ** 0.5) + hyper["eps"]
    new = (
        weight * (1 - hyper["lr"] * hyper["weight_decay"])
        - (hyper["lr"] / (1 - hyper["beta1"] ** step)) * m / denom
    )
    return torch.where(keep, new, weight), m, v


def test_compiled_step_is_adamw_on_the_kept_entries_only():
    generator = torch.Generator().manual_seed(0)
    n = 300_001  # several parallel blocks and a ragged end
    weight, grad = torch.randn(n, generator=generator), torch.randn(n, generator=generator)
    exp_avg = torch.randn(n, generator=generator) * 0.01
    exp_avg_sq = torch.rand(n, generator=generator) * 1e-4
    hyper = _hyper(lr=1e-2, weight_decay=0.1, step=3)
    expected_inputs = [t.clone() for t in (weight, grad, exp_avg, exp_avg_sq)]
    keep = torch.empty(n, dtype=torch.bool)
    seeds = (2_000_000_011, 77)
    child_tuning_kernel.masked_adamw_step(weight, grad, exp_avg, exp_avg_sq, keep, seeds, hyper)
    assert abs(keep.float().mean().item() - 0.3) < 0.005
    assert torch.equal(grad, expected_inputs[1])  # the gradient is read, not rewritten
    want_weight, want_m, want_v = _adamw_reference(*expected_inputs, keep, 3, hyper)
    assert torch.equal(weight[~keep], expected_inputs[0][~keep])  # exactly, decay included
    assert (weight[keep] != expected_inputs[0][keep]).float().mean() > 0.99
    torch.testing.assert_close(weight, want_weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(exp_avg, want_m, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(exp_avg_sq, want_v, rtol=1e-6, atol=1e-12)


def test_compiled_masks_are_fresh_reproducible_and_unbiased():
    n = 1 << 20
    hyper = {**_hyper(lr=0.0, weight_decay=0.0, step=1), "scale": 1.0}

    def draw(seed=None):
        if seed is not None:
            torch.manual_seed(seed)
        keep = torch.empty(n, dtype=torch.bool)
        tensors = [torch.zeros(n) for _ in range(4)]
        seeds = step_seeds(1, torch.device("cpu"))[0]  # this step's, from torch's generator
        child_tuning_kernel.masked_adamw_step(*tensors, keep, seeds, hyper)
        return keep

    first, second = draw(1), draw()
    again = draw(1)
    assert torch.equal(first, again)  # torch.manual_seed fixes the masks
    for mask in (first, second):
        assert abs(mask.float().mean().item() - 0.3) < 0.003
    # Independent across steps (overlap p^2) and between neighbouring entries.
    assert abs((first & second).float().mean().item() - 0.09) < 0.003
    assert abs((first[1:] & first[:-1]).float().mean().item() - 0.09) < 0.003
    # Each step's seed differs, so every tensor of a step gets its own mask too.
    assert not torch.equal(first, second)


def test_compiled_step_runs_inside_the_optimizer_and_masks_exactly():
    model, tokenizer = _f_model(0.3, "llama")
    assert all(child_tuning_kernel.available(p) for p in model.parameters())
    assert not child_tuning_kernel.available(torch.zeros(3, dtype=torch.bfloat16))
    batch = batch_for("llama", tokenizer)
    hooks = child_tuning.hooks(model, child_tuning._state(model).config)
    optimizer = hooks.replace_optimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    )
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
        masks = child_tuning._state(model).masking.masks
        for name, parameter in model.named_parameters():
            assert torch.equal(parameter.detach()[~masks[name]], before[name][~masks[name]])
            assert (parameter.detach()[masks[name]] != before[name][masks[name]]).any()
    touched = child_tuning._state(model).masking.touched
    counts = child_tuning._state(model).masking.touched_count  # kept as the compiled pass sets them
    assert counts == {name: int(t.sum()) for name, t in touched.items()}
    share = sum(int(t.sum()) for t in touched.values()) / sum(t.numel() for t in touched.values())
    assert abs(share - (1 - 0.7**3)) < 0.03


def test_compiled_step_gives_the_same_bits_on_any_thread_count_or_address():
    """One process of a distributed run steps on 1 thread, a single process on 2, and tensors sit
    wherever the allocator put them: the update must not depend on either."""
    generator = torch.Generator().manual_seed(1)
    n = 300_001
    values = [torch.randn(n, generator=generator) for _ in range(4)]
    values[3] = values[3].abs() * 1e-4  # a second moment
    hyper = _hyper(lr=1e-2, weight_decay=0.1, step=2)
    threads = torch.get_num_threads()
    results = []
    try:
        for thread_count, offset in ((1, 0), (2, 0), (2, 1), (1, 3)):
            torch.set_num_threads(thread_count)
            tensors = [torch.empty(n + 8)[offset : offset + n].copy_(v) for v in values]
            keep = torch.empty(n, dtype=torch.bool)
            child_tuning_kernel.masked_adamw_step(*tensors, keep, (3, 4_000_000_000), hyper)
            results.append([tensors[0], tensors[2], tensors[3], keep])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for mine, first in zip(other, results[0], strict=True):
            assert torch.equal(mine, first)


@pytest.mark.parametrize("ratio", [0.3, 1e-9, 0.99999])
def test_compiled_and_torch_paths_draw_the_same_masks(ratio):
    """One random stream: for the same seeds, the kernel's masks equal keep_mask's bit for bit
    (several parallel blocks, a ragged end, chunk boundaries, seeds whose sums wrap)."""
    n = 300_001
    hyper = {**_hyper(lr=0.0, weight_decay=0.0, step=1), "threshold": keep_threshold(ratio)}
    for seeds in ((0, 0), (2**32 - 1, 2**32 - 1), (123_456_789, 3_999_999_999)):
        compiled = torch.empty(n, dtype=torch.bool)
        child_tuning_kernel.masked_adamw_step(
            *[torch.zeros(n) for _ in range(4)], compiled, seeds, hyper
        )
        drawn = torch.empty(n, dtype=torch.bool)
        scratch = torch.empty(2 * 1000, dtype=torch.int64)
        for start in range(0, n, 1000):  # chunked, as the torch paths draw
            stop = min(start + 1000, n)
            keep_mask(start, seeds, hyper["threshold"], drawn[start:stop], scratch)
        assert torch.equal(compiled, drawn), seeds
