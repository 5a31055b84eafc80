"""ReLoRA: at each restart the base weight moves by exactly the merged B A, A and B start again, the
optimizer state is reset as configured, and the learning rate follows the jagged schedule; the
pipeline binds its optimizer through replace_optimizer and, run through several restarts, ends with
the base plus exactly the merged updates; exports (merged model, SVD LoRA) load elsewhere."""

import json
import math

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import peftkit
from contract import batch_for, logits, tiny
from peftkit.errors import ConfigError
from peftkit.methods import relora
from peftkit.methods.relora import ReLoraConfig
from peftkit.methods.relora import export as relora_export
from peftkit.methods.relora import optimizer as relora_optimizer
from peftkit.plan import resolve
from peftkit.recipe import recipe_from_dict
from peftkit.training import run


def _snapshot(model, optimizer, params):
    """(per layer: W, A, B, scale) and (per parameter: its optimizer state), copied."""
    layers = {
        name: (
            layer.get_base_layer().weight.detach().clone(),
            layer.lora_A["default"].weight.detach().clone(),
            layer.lora_B["default"].weight.detach().clone(),
            layer.scaling["default"],
        )
        for name, layer in relora.lora_layers(model).items()
    }
    moments = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in params}
    return layers, moments


def _train_loop(mode, fraction=0.99):
    """Custom loop: AdamW + the jagged LambdaLR; returns what each step looked like."""
    base, tokenizer = tiny("llama")
    batch = batch_for("llama", tokenizer)
    config = ReLoraConfig(
        rank=2,
        dropout=0.0,
        restart_every=3,
        restart_warmup_steps=2,
        optimizer_reset=mode,
        prune_fraction=fraction,
    )
    model = peftkit.apply(base, config)
    hooks = peftkit.api.applied(model).method.training_hooks(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    schedule = relora_optimizer.jagged_cosine_schedule(8, 1, 3, 2, min_ratio=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    relora.bind_optimizer(model, optimizer, rewarm=False)  # the LambdaLR already re-warms
    model.train()
    records = []
    for step in range(8):
        model(**batch).loss.backward()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        before, moments = _snapshot(model, optimizer, params)
        hooks.after_optimizer_step(model, step)
        records.append((step, lr, before, moments, _snapshot(model, optimizer, params)))
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, params, records


def test_restart_merges_reinitialises_and_resets_fully():
    model, optimizer, params, records = _train_loop("full")
    lora_ids = {id(p) for p in relora.lora_parameters(model)}
    assert relora.state(model).restarts == 2  # after steps 2 and 5
    for step, _, before, moments, (after, moments_after) in records:
        restarted = (step + 1) % 3 == 0
        for name, (w_before, a_before, b_before, scale) in before.items():
            w_after, a_after, b_after, _ = after[name]
            if not restarted:
                assert torch.equal(w_after, w_before) and torch.equal(a_after, a_before)
                continue
            # W moved by exactly B A * scale of the adapter as it stood before the restart.
            torch.testing.assert_close(
                w_after - w_before, b_before @ a_before * scale, atol=1e-6, rtol=1e-5
            )
            assert torch.count_nonzero(b_before) > 0
            assert torch.count_nonzero(b_after) == 0  # B zero: the model is unchanged by it
            assert not torch.equal(a_after, a_before)  # A redrawn, Kaiming uniform bound
            assert a_after.abs().max() <= 1 / math.sqrt(a_after.shape[1]) + 1e-6
        for p in params:
            old, new = moments[id(p)], moments_after[id(p)]
            if restarted and id(p) in lora_ids:
                assert new["exp_avg"].abs().sum() == 0 and new["exp_avg_sq"].sum() == 0
                assert old["exp_avg_sq"].sum() > 0
                assert new["step"] == old["step"]  # the count is kept
            else:
                assert torch.equal(new["exp_avg"], old["exp_avg"])


def test_restart_prunes_moments_by_magnitude():
    model, optimizer, params, records = _train_loop("prune", fraction=0.75)
    _, _, _, moments, (_, moments_after) = records[2]  # the first restart
    for p in relora.lora_parameters(model):
        for key in ("exp_avg", "exp_avg_sq"):
            old, new = moments[id(p)][key].flatten(), moments_after[id(p)][key].flatten()
            keep = old.numel() - int(0.75 * old.numel())
            survivors = new != 0
            assert 0 < int(survivors.sum()) <= keep
            # The survivors are the largest-magnitude entries, with their values untouched.
            top = torch.zeros_like(survivors)
            top[old.abs().topk(int(survivors.sum())).indices] = True
            assert torch.equal(survivors, top)
            assert torch.equal(new[survivors], old[survivors])


def test_jagged_schedule_closed_form():
    model, optimizer, params, records = _train_loop("full")
    lrs = [record[1] for record in records]

    def expected(step):  # warm-up 1, cosine over 8 steps to 0.1, re-warm 2 steps after restarts
        if step < 1:
            return 1e-2 * (step + 1) / 2
        cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 7))
        offset = step % 3
        factor = offset / 2 if step >= 3 and offset < 2 else 1.0
        return 1e-2 * cosine * factor

    for step, lr in enumerate(lrs):
        assert lr == pytest.approx(expected(step), rel=1e-9, abs=1e-15), step
    assert lrs[3] == 0 and lrs[6] == 0  # the first step after a restart only rebuilds moments


def _tiny_recipe(tmp_path, **training):
    """ReLoRA (rank 2, restart every 4 steps, re-warm 2) on a tiny-BERT classification file."""
    rows = [{"text": "good" if i % 2 else "bad", "label": str(i % 2)} for i in range(32)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return recipe_from_dict(
        {
            "model": "tiny-bert",
            "task": {"type": "classification", "train_file": str(data), "max_length": 16},
            "method": {"name": "relora", "rank": 2, "restart_every": 4, "restart_warmup_steps": 2},
            "training": {"batch_size": 8, "learning_rate": 0.01, **training},
            "output_dir": str(tmp_path / "run"),
        }
    )


def test_pipeline_binds_optimizer_and_rewarms(tmp_path, monkeypatch):
    seen = []  # lr inside AdamW.step, after peftkit's pre-step hook scaled it
    original_step = torch.optim.AdamW.step

    def spy_step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy_step)
    restarts = []
    original_restart = relora.restart

    def spy_restart(model, optimizer=None):
        restarts.append(relora.state(model).optimizer)
        return original_restart(model, optimizer)

    monkeypatch.setattr(relora, "restart", spy_restart)
    run(resolve(_tiny_recipe(tmp_path, max_steps=10, lr_scheduler="constant", warmup_ratio=0)))
    assert len(restarts) == 2 and all(isinstance(o, torch.optim.Optimizer) for o in restarts)
    expected = [0.01 * relora.rewarm_factor(step, 4, 2) for step in range(10)]
    assert seen == pytest.approx(expected)
    assert seen[4] == 0 and seen[5] == pytest.approx(0.005) and seen[8] == 0


def test_pipeline_through_two_restarts_ends_at_base_plus_the_merged_updates(tmp_path, monkeypatch):
    """peftkit.train.run, 10 steps, restart every 4: restarts after steps 3 and 7, then two more
    steps of a live adapter. Each adapted weight ends as its pretrained value plus exactly the two
    merged B A (recorded as each restart returned them), and the saved update is that sum."""
    bound = {}
    original_bind = relora.bind_optimizer

    def spy_bind(model, optimizer, rewarm=True):  # replace_optimizer binds here, before step 0
        layers = relora.lora_layers(model)
        bound["model"], bound["optimizer"] = model, optimizer
        bound["base"] = {n: m.get_base_layer().weight.detach().clone() for n, m in layers.items()}
        return original_bind(model, optimizer, rewarm)

    merges = []
    original_merge = relora.merge_and_reinit

    def spy_merge(model):
        deltas = original_merge(model)
        merges.append({name: delta.detach().float().clone() for name, delta in deltas.items()})
        return deltas

    monkeypatch.setattr(relora, "bind_optimizer", spy_bind)
    monkeypatch.setattr(relora, "merge_and_reinit", spy_merge)
    summary = run(
        resolve(_tiny_recipe(tmp_path, max_steps=10, lr_scheduler="constant", warmup_ratio=0.0))
    )
    model = bound["model"]
    assert summary["steps"] == 10
    assert relora.state(model).restarts == 2 and len(merges) == 2
    assert relora.state(model).optimizer is bound["optimizer"]
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    update = relora_export.accumulated_update(model)
    for name, layer in relora.lora_layers(model).items():
        merged = merges[0][name] + merges[1][name]
        assert all(m[name].abs().max() > 0 for m in merges)  # both restarts moved the weight
        weight = layer.get_base_layer().weight.detach()
        torch.testing.assert_close(weight, bound["base"][name] + merged, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(relora.state(model).merged[name], merged, atol=1e-7, rtol=1e-6)
        key = f"base_model.model.{name}{relora.DELTA_SUFFIX}"
        torch.testing.assert_close(saved[key], merged, atol=1e-7, rtol=1e-6)
        live = layer.get_delta_weight("default")  # steps 8 and 9: lr 0, then half
        assert live.abs().max() > 0
        torch.testing.assert_close(update[name], merged + live, atol=1e-7, rtol=1e-6)


def test_save_load_after_restarts_and_exports(tmp_path):
    model, _, _, _ = _train_loop("full")
    base, tokenizer = tiny("llama")
    batch = batch_for("llama", tokenizer)
    tuned = logits(model, batch)
    peftkit.save(model, tmp_path / "adapter")
    loaded = peftkit.load(tiny("llama")[0], tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, batch), tuned, atol=1e-5, rtol=0)

    relora_export.save_merged(model, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(plain, batch), tuned, atol=1e-5, rtol=1e-5)

    # Two restarts + the live adapter: the update has rank up to 6 per matrix.
    errors_full = relora_export.save_as_lora(model, tmp_path / "lora6", rank=6)
    assert max(errors_full.values()) < 1e-5
    theirs = peft.PeftModel.from_pretrained(tiny("llama")[0], tmp_path / "lora6")
    torch.testing.assert_close(logits(theirs, batch), tuned, atol=1e-4, rtol=1e-4)
    errors_low = relora_export.save_as_lora(model, tmp_path / "lora1", rank=1)
    # Independent check of the reported error: from the SVD's tail singular values.
    for name, update in relora_export.accumulated_update(model).items():
        s = torch.linalg.svdvals(update)
        expected = (s[1:].square().sum().sqrt() / s.square().sum().sqrt()).item()
        assert errors_low[name] == pytest.approx(expected, rel=1e-3)
    assert all(errors_low[n] > errors_full[n] for n in errors_low)


def test_bad_input():
    with pytest.raises(ConfigError, match="restart_every must be at least 1"):
        ReLoraConfig(restart_every=0)
    with pytest.raises(ConfigError, match="optimizer_reset"):
        ReLoraConfig(optimizer_reset="half")
    with pytest.raises(ConfigError, match="restart_warmup_steps"):
        ReLoraConfig(restart_every=5, restart_warmup_steps=5)
    with pytest.raises(ConfigError, match="restart_every must be at least 1"):
        relora_optimizer.jagged_cosine_schedule(10, 1, 0, 0)
    base, _ = tiny("gpt2")
    config = ReLoraConfig(rank=2, restart_every=1, restart_warmup_steps=0)
    model = peftkit.apply(base, config)
    hooks = peftkit.api.applied(model).method.training_hooks(model, config)
    with pytest.raises(ConfigError, match="bind_optimizer"):
        hooks.after_optimizer_step(model, 0)  # a restart is due but no optimizer was bound


def test_resume_between_restarts_matches_an_uninterrupted_run(tmp_path):
    recipe = _tiny_recipe(tmp_path, max_steps=12, save_steps=5)
    run(resolve(recipe))
    adapter = tmp_path / "run" / "adapter" / "adapter_model.safetensors"
    uninterrupted = load_file(adapter)
    # Step 5 is after the first restart and inside its re-warm: both must carry over.
    run(resolve(recipe), resume=str(tmp_path / "run" / "checkpoints" / "checkpoint-5"))
    resumed = load_file(adapter)
    assert resumed.keys() == uninterrupted.keys()
    assert any(k.endswith(relora.DELTA_SUFFIX) for k in resumed)
    for key, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[key], tensor, atol=1e-5, rtol=1e-4)
