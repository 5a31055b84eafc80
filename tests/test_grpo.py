"""GRPO (task.type: grpo) on TRL's GRPOTrainer: rewards equal their closed forms and the SQL
scorer's own results, a user's reward by import path with named errors when it raises or returns
anything but one number per completion, advantages and loss as TRL defines them (the KL term's
reference is the base: the adapter switched off), one step moves only the adapter, and
`peftkit train` runs the recipe."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
import trl_support
from trl_support import base_model, perturb_adapter

import peftkit
from peftkit.errors import ConfigError, MalformedExampleError, RewardError
from peftkit.models import load_model
from peftkit.tasks import rewards
from peftkit.tasks.config import GRPOConfig, TaskConfig
from peftkit.tasks.types import get_task_type

PROMPTS = [{"prompt": "copy: ab cd\n", "gold": "ab cd"}, {"prompt": "copy: e f\n", "gold": "e f"}]
GRPO = get_task_type("grpo")
LORA = peftkit.LoraConfig(rank=4)


def id_reward(completion_ids: list[list[int]], **_: object) -> list[float]:
    """A reward read from the completion's token ids (no decoding): their sum modulo 7."""
    return [float(sum(ids) % 7) for ids in completion_ids]


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewards and bundled sets registered in a test are gone after it."""
    from peftkit.data import bundled

    monkeypatch.setattr(rewards, "_REWARDS", dict(rewards._REWARDS))
    monkeypatch.setattr(bundled, "_DATASETS", dict(bundled._DATASETS))


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """A user's reward module on the path, forgotten after the test."""
    (tmp_path / "user_rewards.py").write_text(
        "def good(completions, **kw):\n    return [float(len(c)) for c in completions]\n"
        "def raises(completions, **kw):\n    return 1 / 0\n"
        "def text(completions, **kw):\n    return 'high'\n"
        "def short(completions, **kw):\n    return [1.0]\n"
        "def nones(completions, **kw):\n    return [None for c in completions]\n"
        "def nan(completions, **kw):\n    return [float('nan') for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("user_rewards", None)


def built_trainer(tmp_path: Path, task: TaskConfig, options: GRPOConfig, method=LORA):  # noqa: ANN001, ANN201
    """(trainer, notes, applied model, task data) through peftkit's builder on PROMPTS."""
    from peftkit.training.grpo import build_grpo_trainer

    return trl_support.built_trainer(
        tmp_path, build_grpo_trainer, task, PROMPTS, method, options, batch_size=8
    )


def grpo_task(*names: str) -> TaskConfig:
    """A grpo task section naming these rewards."""
    return TaskConfig(type="grpo", train_file="unused.jsonl", rewards=names)


def completion_logps(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """log p of each completion token given everything before it, by hand from the logits."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    start = inputs["prompt_ids"].shape[1]
    logps = F.log_softmax(logits[:, start - 1 : -1].double(), -1)
    return logps.gather(2, inputs["completion_ids"][..., None])[..., 0]


# Rewards.


def test_format_reward_is_a_whole_match() -> None:
    default = rewards.resolve_reward("format", grpo_task("format"))
    texts = ["<think>a</think> <answer>b</answer>", "<answer>b</answer>",
             "<think>a\nb</think>\n<answer>c</answer> extra",
             " <think></think><answer></answer>\n"]  # fmt: skip
    assert default(prompts=["p"] * 4, completions=texts) == [1.0, 0.0, 0.0, 1.0]
    task = TaskConfig(type="grpo", train_file="x", rewards=("format",), format_pattern="SELECT .*")
    conversational = [[{"role": "assistant", "content": "SELECT 1"}], "select 1"]
    assert rewards.resolve_reward("format", task)(["p", "p"], conversational) == [1.0, 0.0]


def test_sql_execution_reward_is_the_scorers_result(registry: None) -> None:
    import peftkit.apps
    from peftkit.apps.text_to_sql.database import default_database
    from peftkit.apps.text_to_sql.scoring import evaluate, extract_sql

    peftkit.apps.register()
    assert "sql-execution" in rewards.reward_names()
    gold = "SELECT name FROM branches ORDER BY name"
    completions = [gold, f"SQL: {gold};", "SELECT name FROM branches WHERE 0",
                   "SELEC name FROM branches", "DROP TABLE branches"]  # fmt: skip
    reward = rewards.resolve_reward("sql-execution", grpo_task("sql-execution"))
    values = reward(prompts=["q"] * 5, completions=completions, sql=[gold] * 5)
    records = evaluate([{"sql": gold}] * 5, [extract_sql(c) for c in completions],
                       default_database())["records"]  # fmt: skip
    expected = [1.0 if r["execution_match"] else 0.1 if r["failure"] is None else 0.0
                for r in records]  # fmt: skip
    assert values == expected == [1.0, 1.0, 0.1, 0.0, 0.0]
    with pytest.raises(RewardError, match="'sql' column"):
        reward(prompts=["q"], completions=[gold])


def test_a_users_reward_by_import_path(user_module: None) -> None:
    good = rewards.resolve_reward("user_rewards:good", grpo_task("user_rewards:good"))
    assert good(prompts=["p", "p"], completions=["ab", "abcd"]) == [2.0, 4.0]
    cases = {
        "user_rewards:raises": "raised ZeroDivisionError",
        "user_rewards:text": "returned str 'high'",
        "user_rewards:short": "returned 1 values for 2 completions",
        "user_rewards:nones": "returned None for completion 0",
        "user_rewards:nan": "returned nan for completion 0",
    }
    for name, message in cases.items():
        with pytest.raises(RewardError, match=message) as caught:
            rewards.resolve_reward(name, grpo_task(name))(
                prompts=["p", "p"], completions=["a", "b"]
            )
        assert name in str(caught.value)
    with pytest.raises(RewardError, match="has no function 'missing'"):
        rewards.resolve_reward("user_rewards:missing", grpo_task("x"))
    with pytest.raises(RewardError, match="importing no_such_module failed"):
        rewards.resolve_reward("no_such_module:f", grpo_task("x"))
    with pytest.raises(RewardError, match="Did you mean 'format'"):
        rewards.resolve_reward("formatt", grpo_task("x"))


def test_task_and_section_checks() -> None:
    from peftkit.recipe import recipe_from_dict, recipe_to_dict

    with pytest.raises(ConfigError, match="needs task.rewards"):
        TaskConfig(type="grpo", train_file="x")
    with pytest.raises(ConfigError, match="one weight per reward"):
        TaskConfig(type="grpo", train_file="x", rewards=("format",), reward_weights=(1.0, 2.0))
    with pytest.raises(ConfigError, match="for task.type: grpo"):
        TaskConfig(type="causal-lm", train_file="x", rewards=("format",))
    with pytest.raises(ConfigError, match="at least 2"):
        GRPOConfig(num_generations=1)
    with pytest.raises(ConfigError, match="Did you mean 'dapo'"):
        GRPOConfig(loss_type="dap")
    with pytest.raises(ConfigError, match="task.type: grpo"):
        recipe_from_dict({"task": {"dataset": "copy-words", "type": "seq2seq"}, "grpo": {}})
    recipe = recipe_from_dict({"task": {"dataset": "copy-preferences", "type": "grpo",
                                        "rewards": ["format"], "reward_weights": [0.5]},
                               "grpo": {"num_generations": 2, "beta": 0.01}})  # fmt: skip
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe
    with pytest.raises(MalformedExampleError, match="an empty prompt: row 1"):
        GRPO.check_rows(grpo_task("format"), [{"prompt": "a"}, {"prompt": " "}], "rows")
    with pytest.raises(MalformedExampleError, match="completions"):
        GRPO.check_rows(grpo_task("format"), [{"prompt": "a", "completions": 1}], "rows")


# The trainer.


def test_advantages_and_loss_are_trls_definitions(tmp_path: Path, registry: None) -> None:
    rewards.register_reward("id-sum", id_reward)
    beta = 0.1
    options = GRPOConfig(num_generations=4, max_completion_length=6, beta=beta)
    trainer, notes, model, _ = built_trainer(tmp_path, grpo_task("id-sum"), options)
    assert "switched off" in notes["reference"]
    perturb_adapter(model)  # the KL term is then not zero
    model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    assert [row["prompt"] for row in batch[:4]] == [batch[0]["prompt"]] * 4  # one group
    inputs = trainer._generate_and_score_completions(batch)
    mask = inputs["completion_mask"]
    ids = [row[m.bool()].tolist() for row, m in zip(inputs["completion_ids"], mask, strict=True)]
    reward = torch.tensor(id_reward(ids)).view(-1, 4)
    assert reward.std(1).min() > 0  # each group's completions differ in reward
    # GRPO's advantage: the reward less its group's mean, over its group's std (+1e-4).
    expected = (reward - reward.mean(1, keepdim=True)) / (reward.std(1, keepdim=True) + 1e-4)
    assert torch.allclose(inputs["advantages"], expected.flatten(), atol=1e-5)
    # The reference: the base model, by hand.
    base = completion_logps(base_model(), inputs)
    assert torch.allclose(inputs["ref_per_token_logps"].double() * mask, base * mask, atol=1e-4)
    # DAPO's loss at ratio 1: sum over tokens of (-A + beta * KL) / all completion tokens, with
    # KL = exp(ref - logp) - (ref - logp) - 1.
    policy = completion_logps(model, inputs)
    kl = torch.exp(base - policy) - (base - policy) - 1
    per_token = -inputs["advantages"][:, None].double() + beta * kl
    closed = float((per_token * mask).sum() / mask.sum())
    trainer.current_gradient_accumulation_steps = 1
    loss = float(trainer.compute_loss(model, inputs).detach())
    assert loss == pytest.approx(closed, abs=1e-4)
    assert abs(closed - float(-inputs["advantages"].mul(mask.sum(1)).sum() / mask.sum())) > 1e-6


def test_a_method_without_switch_off_gets_a_frozen_copy_as_reference(
    tmp_path: Path, registry: None
) -> None:
    from peftkit.registry import get_method

    rewards.register_reward("id-sum", id_reward)
    options = GRPOConfig(num_generations=4, max_completion_length=4, beta=0.1)
    full = get_method("full").config_cls()
    trainer, notes, model, _ = built_trainer(tmp_path, grpo_task("id-sum"), options, full)
    assert notes["reference"].startswith("a frozen copy") and notes["reference_copy_mib"] > 0
    perturb_adapter(model)  # full fine-tuning: the policy's own weights move; the copy must not
    model.train()
    inputs = trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader())))
    mask = inputs["completion_mask"]
    base = completion_logps(base_model(), inputs)
    assert torch.allclose(inputs["ref_per_token_logps"].double() * mask, base * mask, atol=1e-4)
    assert ((completion_logps(model, inputs) - base) * mask).abs().max() > 1e-3


def test_conversational_prompts_render_with_the_generation_prompt() -> None:
    tokenizer = load_model("tiny-llama", "causal-lm")[1]
    rows = [{"prompt": [{"role": "user", "content": "copy: a b"}], "gold": "a b"}]
    data = GRPO.prepare(grpo_task("format"), tokenizer, rows, rows)
    # peftkit's fallback template (the tiny tokenizer has none), written out by hand:
    assert data.train_records == [{"gold": "a b", "prompt": "<|user|>\ncopy: a b\n<|assistant|>\n"}]


def test_one_grpo_step_moves_only_the_adapter(tmp_path: Path, registry: None) -> None:
    rewards.register_reward("id-sum", id_reward)
    trainer, notes, model, data = built_trainer(
        tmp_path, grpo_task("id-sum"), GRPOConfig(num_generations=4, max_completion_length=6)
    )
    assert notes["reference"].startswith("none") and trainer.ref_model is None
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in name for name in changed)
    # Evaluation: greedy completions scored by the same reward (it reads completion_ids), against
    # transformers' generate on each prompt alone, cut at its first EOS.
    tokenizer = data.tokenizer
    expected = []
    model.eval()
    for row in PROMPTS:
        ids = torch.tensor([tokenizer(row["prompt"])["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=data.max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        new = out[0, ids.shape[1] :].tolist()
        expected += id_reward([new[: new.index(tokenizer.eos_token_id)]
                               if tokenizer.eos_token_id in new else new])  # fmt: skip
    scores = GRPO.evaluate(model, data, None, 2)
    assert sum(expected) > 0  # the completions differ from an all-zero score
    assert scores["mean_reward"] == scores["reward/id-sum"] == pytest.approx(sum(expected) / 2)


def test_a_bad_reward_stops_training_by_name(tmp_path: Path, user_module: None) -> None:
    task = grpo_task("user_rewards:nones")
    options = GRPOConfig(num_generations=4, max_completion_length=4)
    trainer, _, _, _ = built_trainer(tmp_path, task, options)
    with pytest.raises(RewardError, match="'user_rewards:nones' returned None"):
        trainer.train()


def test_a_step_that_splits_a_group_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="multiple of num_generations"):
        built_trainer(tmp_path, grpo_task("format"), GRPOConfig(num_generations=3))


def test_peftkit_train_runs_the_sql_recipe(tmp_path: Path, registry: None) -> None:
    from peftkit.cli import main

    recipe = Path(__file__).parents[1] / "recipes" / "tiny-grpo-lora.yaml"
    output = tmp_path / "run"
    overrides = [f"output_dir={output}", "training.max_steps=1", "task.max_train_examples=4",
                 "task.max_eval_examples=2", "task.max_new_tokens=4",
                 "grpo.max_completion_length=4", "training.threads=1"]  # fmt: skip
    with warnings.catch_warnings():  # main() sets a warnings filter: keep it to this test
        assert main(["train", str(recipe), *[a for o in overrides for a in ("--set", o)]]) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["task"] == "grpo" and summary["steps"] == 1
    assert summary["grpo"]["rewards"] == ["sql-execution", "format"]
    assert summary["grpo"]["rollouts"].startswith("peftkit")  # the recipe's (and the default)
    assert summary["reference"].startswith("none")
    after = summary["eval_after"]
    weighted = after["reward/sql-execution"] + 0.2 * after["reward/format"]
    assert math.isclose(after["mean_reward"], weighted, abs_tol=1e-9)
    assert (output / "adapter" / "adapter_model.safetensors").is_file()
