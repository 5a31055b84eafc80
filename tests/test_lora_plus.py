"""LoRA+: B's learning rate is ratio x A's, through the replace_optimizer hook.

Checked three ways: the regrouped optimizer (type, weight-decay groups and parameters kept, every
B matrix at ratio x lr); the first AdamW step, whose size per entry is the learning rate (so B
moves ratio x lr per entry, the closed form of Adam's first step); and a real `peftkit train` run,
whose Trainer optimizer and resumed checkpoint keep the groups."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftkit
from contract import batch_for, logits, tiny
from peftkit.cli import main
from peftkit.methods.lora.plus import is_lora_b


def _trainer_like_optimizer(model, lr):
    """AdamW with Trainer's two groups: weight decay on matrices, none on biases and norms."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() <= 1]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=lr
    )


def _hooks(model):
    state = peftkit.api.applied(model)
    return state.method.training_hooks(model, state.config)


def test_b_matrices_get_their_own_groups_at_ratio_times_lr():
    model = peftkit.apply(tiny("bert")[0], peftkit.LoraConfig(loraplus_lr_ratio=16.0))
    optimizer = _trainer_like_optimizer(model, lr=1e-3)
    before = {id(p) for g in optimizer.param_groups for p in g["params"]}
    regrouped = _hooks(model).replace_optimizer(model, optimizer)
    assert regrouped is optimizer and type(regrouped) is torch.optim.AdamW
    after = [id(p) for g in regrouped.param_groups for p in g["params"]]
    assert sorted(after) == sorted(before), "every parameter once, none lost"
    names = {id(p): n for n, p in model.named_parameters()}
    fast = 0
    for group in regrouped.param_groups:
        # B matrices and 1-D tensors (the new head's bias) at ratio x lr, the rest at lr
        kinds = {is_lora_b(names[id(p)]) or p.ndim == 1 for p in group["params"]}
        assert len(kinds) == 1, "a group holds B matrices and 1-D tensors or neither"
        assert group["lr"] == (16e-3 if kinds == {True} else 1e-3)
        fast += len(group["params"]) if kinds == {True} else 0
    assert fast == sum(
        is_lora_b(n) or p.ndim == 1 for n, p in model.named_parameters() if p.requires_grad
    )
    # The weight-decay split survives inside each kind.
    assert {g["weight_decay"] for g in regrouped.param_groups} == {0.01, 0.0}


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_first_step_moves_b_by_ratio_times_lr(family):
    torch.manual_seed(0)
    base, tokenizer = tiny(family)
    batch = batch_for(family, tokenizer)
    model = peftkit.apply(base, peftkit.LoraConfig(dropout=0.0, loraplus_lr_ratio=8.0))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _hooks(model).replace_optimizer(
        model, torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, eps=1e-12)
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    model(**batch).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    for name, p in model.named_parameters():
        if name not in before or not is_lora_b(name):
            continue
        # Adam's first step: m / sqrt(v) = g / |g|, so each entry moves by exactly lr_B.
        lr = 8e-3
        expected = before[name] - lr * torch.sign(grads[name])
        torch.testing.assert_close(p.detach(), expected, atol=1e-7, rtol=1e-5)


def _recipe(folder, output):
    rows = [{"prompt": f"count {i}:", "response": " " + " ".join(str(i + k) for k in range(3))}
            for i in range(24)]  # fmt: skip
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        "model: tiny-llama\n"
        f"task: {{type: causal-lm, train_file: {data}, max_length: 32}}\n"
        "method: {name: lora, rank: 4, loraplus_lr_ratio: 4.0}\n"
        "training: {max_steps: 6, batch_size: 4, learning_rate: 0.01, threads: 1, "
        "warmup_ratio: 0.0, save_steps: 2, logging_steps: 2}\n"
        f"output_dir: {output}\n"
    )
    return recipe


def test_a_training_run_keeps_the_ratio_and_resumes_exactly(tmp_path, monkeypatch):
    from peftkit.training.trainer import PeftkitTrainer

    groups = []
    original = PeftkitTrainer.create_optimizer

    def spy(self, model=None):
        optimizer = original(self, model)
        names = {id(p): n for n, p in self.model.named_parameters()}
        groups.append([(g["initial_lr"] if "initial_lr" in g else g["lr"],
                        {is_lora_b(names[id(p)]) for p in g["params"]})
                       for g in optimizer.param_groups])  # fmt: skip
        return optimizer

    monkeypatch.setattr(PeftkitTrainer, "create_optimizer", spy)
    recipe = _recipe(tmp_path, tmp_path / "run")
    assert main(["train", str(recipe), "--output-dir", str(tmp_path / "whole")]) == 0
    assert {lr for lr, kinds in groups[-1] if kinds == {True}} == {0.04}
    assert {lr for lr, kinds in groups[-1] if kinds == {False}} == {0.01}
    saved = json.loads((tmp_path / "whole/adapter/adapter_config.json").read_text())
    assert saved["loraplus_lr_ratio"] == 4.0

    # Crash while saving step 4, resume from step 2: the groups are rebuilt from the checkpoint's
    # config, the optimizer state loads into them, and the result is the uninterrupted run's.
    save_rng = PeftkitTrainer._save_rng_state

    def failing(self, output_dir):
        if self.state.global_step == 4:
            raise RuntimeError("disk full (simulated)")
        save_rng(self, output_dir)

    monkeypatch.setattr(PeftkitTrainer, "_save_rng_state", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["train", str(recipe)])
    monkeypatch.setattr(PeftkitTrainer, "_save_rng_state", save_rng)
    assert main(["train", str(recipe), "--resume"]) == 0
    ours = load_file(tmp_path / "run/adapter/adapter_model.safetensors")
    whole = load_file(tmp_path / "whole/adapter/adapter_model.safetensors")
    for key in whole:
        torch.testing.assert_close(ours[key], whole[key], atol=1e-5, rtol=0)

    # PEFT loads the adapter (ignoring the extra key, with a warning) to the same logits.
    batch = batch_for("llama", tiny("llama")[1])
    theirs = peft.PeftModel.from_pretrained(tiny("llama")[0], tmp_path / "whole/adapter")
    mine = peftkit.load(tiny("llama")[0], tmp_path / "whole/adapter")
    torch.testing.assert_close(logits(theirs, batch), logits(mine, batch), atol=1e-6, rtol=0)


def _rates(optimizer):
    """Each parameter's learning rate in an optimizer, by identity."""
    return {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}


@pytest.mark.parametrize(
    "family, config",
    [
        ("bert", peftkit.DoraConfig(rank=4, loraplus_lr_ratio=16.0)),
        ("llama", peftkit.LoraConfig(rank=4, loraplus_lr_ratio=16.0,
                                     target_modules=["embed_tokens", "q_proj", "v_proj"])),
        ("llama", peftkit.DoraConfig(rank=4, loraplus_lr_ratio=8.0, loraplus_lr_embedding=1e-5,
                                     target_modules=["embed_tokens", "q_proj", "up_proj"])),
    ],
    ids=["dora-with-head", "embedding-lora", "dora-embedding-own-rate"],
)  # fmt: skip
def test_every_rate_is_the_one_peft_create_loraplus_optimizer_gives(family, config):
    # The reference rule, from PEFT itself: DoRA's magnitude vectors and a head's bias (1-D) at
    # ratio x lr, LoRA on an embedding layer at the embedding rate, A and the head's weight at lr.
    from peft.optimizers import create_loraplus_optimizer

    model = peftkit.apply(tiny(family)[0], config)
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    theirs = _rates(
        create_loraplus_optimizer(
            model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=config.loraplus_lr_ratio,
            loraplus_lr_embedding=config.loraplus_lr_embedding,
        )
    )  # fmt: skip
    ours = _rates(_hooks(model).replace_optimizer(model, _trainer_like_optimizer(model, lr=1e-3)))
    assert set(ours) == set(theirs) == set(names)
    wrong = {names[i]: (ours[i], theirs[i]) for i in names if ours[i] != theirs[i]}
    assert not wrong, wrong
    # The kinds the cases exist for are there: magnitudes, embedding factors, B matrices.
    kinds = {part for n in names.values() for part in n.split(".") if part.startswith("lora_")}
    assert "lora_B" in kinds
    if "embed_tokens" in str(config.target_modules):
        assert {"lora_embedding_A", "lora_embedding_B"} <= kinds
        assert {theirs[i] for i, n in names.items() if "lora_embedding" in n} == {
            config.loraplus_lr_embedding
        }
    if config.use_dora:
        magnitudes = [i for i, n in names.items() if "lora_magnitude_vector" in n]
        assert magnitudes and {ours[i] for i in magnitudes} == {1e-3 * config.loraplus_lr_ratio}
