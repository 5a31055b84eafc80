"""AdaLoRA (its contract rows are in test_contract.py): the rank budget falls on the paper's cubic
schedule during an ordinary peftkit training run with no call by the user; the orthogonality
regulariser is counted exactly once; the saved adapter carries the final rank pattern and loads in
PEFT."""

import json

import peft
import pytest
import torch
from peft.tuners.adalora.layer import RankAllocator
from safetensors.torch import load_file

import peftkit
from contract import batch_for, logits, tiny
from peftkit.errors import ConfigError
from peftkit.methods.adalora import AdaLoraConfig, current_ranks, orthogonality_loss
from peftkit.plan import resolve
from peftkit.recipe import recipe_from_dict, recipe_to_dict
from peftkit.training import run


def cubic_budget(step, initial, target, warmup, final, total):
    """The paper's schedule (Zhang et al., 2023, eq. 10), written out independently."""
    if step <= warmup:
        return initial
    if step > total - final:
        return target
    progress = (step - warmup) / (total - final - warmup)
    return int((initial - target) * (1 - progress) ** 3 + target)


def _recipe(tmp_path, method, steps):
    rows = [
        {
            "text": "good fine great" if i % 2 else "bad awful poor",
            "label": "pos" if i % 2 else "neg",
        }
        for i in range(48)
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return recipe_from_dict(
        {
            "model": "tiny-bert",
            "task": {"type": "classification", "train_file": str(data), "max_length": 16},
            "method": method,
            "training": {"max_steps": steps, "batch_size": 8, "learning_rate": 0.02},
            "output_dir": str(tmp_path / "run"),
        }
    )


def test_budget_falls_on_schedule_in_a_plain_training_run(tmp_path, monkeypatch):
    seen = []  # (step, budget asked for, ranks actually kept right after masking)
    original_mask = RankAllocator.mask_to_budget
    original_update = RankAllocator.update_and_allocate

    def spy_update(self, model, global_step, force_mask=False):
        self._spy_step = global_step
        return original_update(self, model, global_step, force_mask)

    def spy_mask(self, model, budget):
        pattern = original_mask(self, model, budget)
        kept = sum(
            int(torch.count_nonzero(p)) for n, p in model.named_parameters() if ".lora_E." in n
        )
        seen.append((self._spy_step, budget, kept))
        return pattern

    monkeypatch.setattr(RankAllocator, "update_and_allocate", spy_update)
    monkeypatch.setattr(RankAllocator, "mask_to_budget", spy_mask)

    steps, warmup, final, matrices = 20, 3, 4, 4  # tiny BERT: query and value in 2 layers
    method = {
        "name": "adalora",
        "init_rank": 6,
        "target_rank": 2,
        "warmup_steps": warmup,
        "final_steps": final,
    }
    summary = run(
        resolve(_recipe(tmp_path, method, steps))
    )  # nobody calls update_and_allocate here
    assert summary["steps"] == steps

    initial, target = 6 * matrices, 2 * matrices
    masked_steps = [step for step, _, _ in seen]
    # Masks from the first step after warm-up through the start of the final phase, every step.
    assert masked_steps == list(range(warmup + 1, steps - final + 1))
    for step, budget, kept in seen:
        assert budget == cubic_budget(step, initial, target, warmup, final, steps)
        assert kept <= budget
    assert seen[-1][1] == target and seen[-1][2] == target
    assert [b for _, b, _ in seen] == sorted([b for _, b, _ in seen], reverse=True)

    # The saved adapter records the final pattern: target_rank per matrix on average.
    adapter = tmp_path / "run" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == steps
    assert saved["orth_reg_weight"] == 0.5  # the configured weight, not the live zero
    assert sum(sum(kept) for kept in saved["rank_pattern"].values()) == target

    # It loads in PEFT itself, with the same outputs as peftkit's load.
    base, tokenizer = peftkit.load_model("tiny-bert", "classification", num_labels=2)
    batch = tokenizer(["good fine", "bad poor"], return_tensors="pt", padding=True)
    ours = peftkit.load(base, adapter)
    assert sum(current_ranks(ours).values()) == target
    expected = logits(ours, batch)
    base2, _ = peftkit.load_model("tiny-bert", "classification", num_labels=2)
    theirs = peft.PeftModel.from_pretrained(base2, adapter)
    torch.testing.assert_close(logits(theirs, batch), expected, atol=1e-5, rtol=0)


def _reference_orthogonality(model):
    """||P^T P - I||_F and ||Q Q^T - I||_F averaged, from the SVD layers' own parameter dicts."""
    terms = []
    for module in model.modules():
        if hasattr(module, "lora_E") and "default" in module.lora_E:
            q = module.lora_A["default"]
            p = module.lora_B["default"]
            terms.append(torch.norm(q @ q.T - torch.eye(q.shape[0]), p="fro"))
            terms.append(torch.norm(p.T @ p - torch.eye(p.shape[1]), p="fro"))
    return sum(terms) / len(terms)


def test_orthogonality_term_is_counted_once(tmp_path):
    base, tokenizer = tiny("gpt2")
    batch = batch_for("gpt2", tokenizer)
    config = AdaLoraConfig(init_rank=4, target_rank=2, orth_reg_weight=0.7, total_steps=10)
    model = peftkit.apply(base, config)
    model.train()
    out = model(**batch)
    # PEFT's forward adds nothing: the loss is the plain shifted cross-entropy of the logits.
    shifted = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    plain = torch.nn.functional.cross_entropy(shifted, batch["labels"][:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, plain)
    hooks = peftkit.api.applied(model).method.training_hooks(model, config)
    reference = 0.7 * _reference_orthogonality(model)
    assert reference > 0.1  # random P, Q are far from orthonormal at the start
    torch.testing.assert_close(hooks.extra_loss(model), reference)
    torch.testing.assert_close(orthogonality_loss(model), reference / 0.7)


def test_orthogonality_term_off_means_no_extra_loss():
    base, _ = tiny("llama")
    config = AdaLoraConfig(init_rank=4, target_rank=2, orth_reg_weight=0.0, total_steps=10)
    model = peftkit.apply(base, config)
    assert peftkit.api.applied(model).method.training_hooks(model, config).extra_loss is None


def test_bad_schedules_are_refused():
    with pytest.raises(ConfigError, match="target_rank <= init_rank"):
        AdaLoraConfig(init_rank=4, target_rank=8)
    with pytest.raises(ConfigError, match="no pruning phase"):
        AdaLoraConfig(warmup_steps=5, final_steps=5, total_steps=10)
    base, _ = tiny("bert")
    config = AdaLoraConfig(init_rank=4, target_rank=2, warmup_steps=6, final_steps=6)
    model = peftkit.apply(base, config)
    hooks = peftkit.api.applied(model).method.training_hooks(model, config)
    with pytest.raises(ConfigError, match="Train longer"):
        hooks.begin_training(model, 10)


def test_resume_mid_pruning_matches_an_uninterrupted_run(tmp_path):
    method = {"name": "adalora", "init_rank": 6, "target_rank": 2, "warmup_steps": 3}
    recipe = _recipe(tmp_path, {**method, "final_steps": 4}, steps=20)
    recipe = recipe_from_dict(
        {
            **recipe_to_dict(recipe),
            "training": {**recipe_to_dict(recipe)["training"], "save_steps": 10},
        }
    )
    run(resolve(recipe))
    run_dir = tmp_path / "run"
    uninterrupted = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    checkpoint = run_dir / "checkpoints" / "checkpoint-10"  # mid-way through the pruning phase
    mid = load_file(checkpoint / "adapter_model.safetensors")
    assert all(t.shape[0] == 6 for k, t in mid.items() if "lora_A" in k)  # not cut mid-run
    assert json.loads((checkpoint / "adapter_config.json").read_text())["rank_pattern"] is None

    run(resolve(recipe), resume=str(checkpoint))
    resumed = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key, tensor in uninterrupted.items():
        assert resumed[key].shape == tensor.shape, key
        torch.testing.assert_close(resumed[key], tensor, atol=1e-5, rtol=1e-4)
