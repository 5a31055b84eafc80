"""Preference tuning (task.type: preference) on TRL's trainers: malformed pairs refused by name,
TRL's formats read from JSONL, CSV and Parquet, the DPO reference is the base (closed form),
losses at initialisation in closed form and against TRL's own DPOTrainer, one step moves only
what the method trains, and `peftkit train` writes a PEFT adapter and summary.json."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
import trl_support
from trl_support import base_model, perturb_adapter

import peftkit
from peftkit.errors import ConfigError, MalformedPairError
from peftkit.models import load_model
from peftkit.tasks.base import read_split
from peftkit.tasks.config import PreferenceConfig, TaskConfig
from peftkit.tasks.types import get_task_type

PAIRS = [  # BUILT for the tests: copy the words (chosen) rather than reverse them (rejected)
    {"prompt": "copy: ab cd\n", "chosen": "ab cd", "rejected": "cd ab"},
    {"prompt": "copy: e f\n", "chosen": "e f", "rejected": "f e"},
    {"prompt": "copy: abc d ef\n", "chosen": "abc d ef", "rejected": "ef d abc"},
    {"prompt": "copy: fa b\n", "chosen": "fa b", "rejected": "b fa"},
]
PREFERENCE = get_task_type("preference")
LORA = peftkit.LoraConfig(rank=4)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Rows as JSON lines."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def prepared(task: TaskConfig, tokenizer: object, rows: list[dict] = PAIRS) -> object:
    """The task's data from rows (train and held out the same)."""
    return PREFERENCE.prepare(task, tokenizer, rows, rows)


def built_trainer(tmp_path: Path, method: object, options: PreferenceConfig, steps: int = 1):  # noqa: ANN201
    """(trainer, notes, applied model, task data) through peftkit's builder on PAIRS."""
    from peftkit.training.preference import build_preference_trainer

    task = TaskConfig(type="preference", train_file="unused.jsonl", max_length=48)
    return trl_support.built_trainer(
        tmp_path, build_preference_trainer, task, PAIRS, method, options, steps=steps
    )


def first_batch(trainer) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The trainer's collated batch of every training pair, in order."""
    dataset = trainer.train_dataset
    return trainer.data_collator([dataset[i] for i in range(len(dataset))])


def closed_form_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum over response tokens of log p(token | everything before it), computed by hand from
    the model's logits (independent of TRL's fused head and of peftkit's evaluation)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = F.log_softmax(logits[:, :-1].double(), -1)
    targets = batch["input_ids"][:, 1:]
    picked = logps.gather(2, targets[..., None])[..., 0]
    return (picked * batch["completion_mask"][:, 1:]).sum(-1)


# Reading and checking pairs (no model).


def test_malformed_rows_are_named_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [*PAIRS, {"prompt": "copy: a\n", "rejected": "b"},
            {"prompt": "copy: a b\n", "chosen": "a b", "rejected": "a b"},
            {"prompt": "  ", "chosen": "x", "rejected": "y"}]  # fmt: skip
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    recipe = tmp_path / "recipe.yaml"
    output = tmp_path / "run"
    recipe.write_text(
        f"model: tiny-llama\ntask: {{type: preference, train_file: {data}, max_length: 32}}\n"
        f"method: {{name: lora, rank: 2}}\ntraining: {{max_steps: 1, batch_size: 2}}\n"
        f"output_dir: {output}\n"
    )
    from peftkit.cli import main

    with warnings.catch_warnings():  # main() sets a warnings filter: keep it to this test
        assert main(["train", str(recipe)]) == 2
    message = capsys.readouterr().err
    assert "no chosen response: row 4" in message
    assert "chosen equal to rejected: row 5" in message
    assert "an empty prompt: row 6" in message
    assert not output.exists()


def test_csv_and_parquet_read_as_jsonl(tmp_path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame(PAIRS)
    frame.to_csv(tmp_path / "pairs.csv", index=False)
    frame.to_parquet(tmp_path / "pairs.parquet")
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    read = {}
    for path in (jsonl, tmp_path / "pairs.csv", tmp_path / "pairs.parquet"):
        task = TaskConfig(type="preference", train_file=str(path), eval_file=str(jsonl))
        read[path.suffix] = read_split(task, PREFERENCE)[0]
    assert read[".csv"] == read[".jsonl"] == read[".parquet"] == PAIRS


def test_conversational_pairs_render_through_the_chat_template() -> None:
    tokenizer = load_model("tiny-llama", "causal-lm")[1]
    task = TaskConfig(type="preference", train_file="unused.jsonl")
    user = [{"role": "user", "content": "copy: a b"}]
    explicit = {"prompt": user, "chosen": [{"role": "assistant", "content": "a b"}],
                "rejected": [{"role": "assistant", "content": "b a"}]}  # fmt: skip
    implicit = {"chosen": user + explicit["chosen"], "rejected": user + explicit["rejected"]}
    data = prepared(task, tokenizer, [explicit, implicit])
    # peftkit's fallback template (the tiny tokenizer has none), written out by hand:
    expected = {"prompt": "<|user|>\ncopy: a b\n<|assistant|>\n", "chosen": "a b</s>",
                "rejected": "b a</s>"}  # fmt: skip
    assert data.train_records == [expected, expected]
    bad = {"chosen": user + explicit["chosen"], "rejected": user + explicit["chosen"]}
    with pytest.raises(MalformedPairError, match="chosen equal to rejected: row 1"):
        PREFERENCE.check_rows(task, [implicit, bad], "the test rows")
    no_prompt = {"chosen": explicit["chosen"], "rejected": explicit["rejected"]}
    with pytest.raises(MalformedPairError, match="an empty prompt"):
        PREFERENCE.check_rows(task, [no_prompt], "the test rows")


def test_a_pair_whose_prompt_fills_max_length_leaves_with_its_record() -> None:
    tokenizer = load_model("tiny-llama", "causal-lm")[1]
    task = TaskConfig(type="preference", train_file="unused.jsonl", max_length=17)
    long = {"prompt": "copy: " + " ".join("abcdefgh"[i % 8] for i in range(30)) + "\n",
            "chosen": "a", "rejected": "b"}  # fmt: skip
    rows = [PAIRS[0], long, *PAIRS[1:]]
    data = prepared(task, tokenizer, rows)
    kept = [r for r in rows if r is not long]
    assert len(tokenizer(long["prompt"])["input_ids"]) >= task.max_length  # it must go
    assert data.dropped == data.dropped_eval == 1
    assert [r["prompt"] for r in data.train_records] == [r["prompt"] for r in kept]
    for record, feature in zip(data.eval_records, data.eval, strict=True):  # in step
        for key in ("chosen", "rejected"):
            whole = tokenizer(record["prompt"] + record[key])["input_ids"]
            assert feature["prompt_ids"] + feature[f"{key}_ids"] == whole[: task.max_length]
    lengths = [max(len(tokenizer(r["prompt"] + r[k])["input_ids"]) for k in ("chosen", "rejected"))
               for r in data.train_records]  # fmt: skip
    assert data.truncated == sum(n > task.max_length for n in lengths) > 0


def test_preference_section_only_with_a_preference_task() -> None:
    from peftkit.recipe import recipe_from_dict, recipe_to_dict

    with pytest.raises(ConfigError, match="task.type: preference"):
        recipe_from_dict({"task": {"dataset": "copy-words", "type": "seq2seq"},
                          "preference": {"beta": 0.2}})  # fmt: skip
    with pytest.raises(ConfigError, match="Did you mean 'hinge'"):
        PreferenceConfig(loss_type="hinj")
    with pytest.raises(ConfigError, match="is a DPO loss"):
        PreferenceConfig(algorithm="orpo", loss_type="ipo")
    recipe = recipe_from_dict({"task": {"dataset": "copy-preferences", "type": "preference"},
                               "preference": {"loss_type": "ipo", "beta": 0.2}})  # fmt: skip
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe
    assert recipe.preference_options.needs_reference


# The reference model and the losses.


def test_reference_is_the_base_with_the_adapter_switched_off(tmp_path: Path) -> None:
    trainer, notes, model, _ = built_trainer(tmp_path, LORA, PreferenceConfig())
    assert "switched off" in notes["reference"] and "reference_copy_mib" not in notes
    assert not list(trainer.ref_model.parameters())  # no second copy of any weight
    perturb_adapter(model)  # the policy now differs from the base; the reference must not
    batch = first_batch(trainer)
    reference = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, batch))
    base = closed_form_logps(base_model(), batch)
    policy = closed_form_logps(model, batch)
    assert torch.allclose(reference.double(), base, atol=1e-4)
    assert (policy - base).abs().max() > 0.1  # the adapter is on outside the reference


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (PreferenceConfig(loss_type="sigmoid"), math.log(2)),  # -log sigmoid(0)
        (PreferenceConfig(loss_type="ipo", beta=0.25), (1 / (2 * 0.25)) ** 2),  # (0 - 1/2b)^2
        (PreferenceConfig(loss_type="hinge"), 1.0),  # relu(1 - 0)
        (PreferenceConfig(loss_type="robust", label_smoothing=0.2), math.log(2)),
    ],
    ids=["sigmoid", "ipo", "hinge", "robust"],
)
def test_dpo_loss_at_initialisation(tmp_path: Path, options: PreferenceConfig, expected: float):  # noqa: ANN201
    trainer, _, _, _ = built_trainer(tmp_path, LORA, options)
    loss = trainer.compute_loss(trainer.model, first_batch(trainer))
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-5)


def test_dpo_loss_equals_trls_own_trainer_and_the_closed_form(tmp_path: Path) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    beta = 0.1
    trainer, _, model, data = built_trainer(tmp_path, LORA, PreferenceConfig())
    perturb_adapter(model)
    batch = first_batch(trainer)
    ours = float(trainer.compute_loss(trainer.model, batch).detach())
    # TRL's own DPOTrainer, untouched, on a copy of the same policy and the base as its reference.
    twin = peftkit.apply(base_model(), LORA)
    twin.load_state_dict(model.state_dict())
    stock = DPOTrainer(
        model=twin, ref_model=base_model(), processing_class=data.tokenizer,
        train_dataset=Dataset.from_list(data.train_records),
        args=DPOConfig(output_dir=str(tmp_path / "stock"), use_cpu=True, bf16=False,
                       gradient_checkpointing=False, report_to="none", max_length=48, beta=beta),
    )  # fmt: skip
    theirs = float(stock.compute_loss(stock.model, batch).detach())
    policy, base = closed_form_logps(model, batch), closed_form_logps(base_model(), batch)
    chosen, rejected = (policy - base).chunk(2)
    closed = float((-F.logsigmoid(beta * (chosen - rejected))).mean())
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert ours == pytest.approx(closed, abs=1e-4)
    assert abs(ours - math.log(2)) > 1e-3  # the perturbed adapter moved the loss off log 2


def test_one_dpo_step_moves_only_the_adapter(tmp_path: Path) -> None:
    trainer, _, model, _ = built_trainer(tmp_path, LORA, PreferenceConfig())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert all("lora_" in name for name in changed)
    assert any("lora_B" in name for name in changed)  # B leaves zero: the adapter now acts


@pytest.mark.parametrize("method", ["full", "bottleneck"])
def test_a_method_without_switch_off_gets_a_frozen_copy(tmp_path: Path, method: str) -> None:
    from peftkit.registry import get_method

    config = get_method(method).config_cls()
    trainer, notes, model, _ = built_trainer(tmp_path, config, PreferenceConfig())
    assert notes["reference"].startswith("a frozen copy") and notes["reference_copy_mib"] > 0
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    trainer.train()  # the policy's own weights move; the copy must not
    batch = first_batch(trainer)
    reference = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, batch))
    base = closed_form_logps(base_model(), batch)
    assert torch.allclose(reference.double(), base, atol=1e-4)
    assert (closed_form_logps(model, batch) - base).abs().max() > 1e-3


def test_an_initialisation_that_changes_the_base_gets_a_frozen_copy(tmp_path: Path) -> None:
    # PiSSA keeps only the residual in the base: switched off, the policy is not its start.
    config = peftkit.LoraConfig(rank=4, init="pissa")
    trainer, notes, model, _ = built_trainer(tmp_path, config, PreferenceConfig())
    assert notes["reference"].startswith("a frozen copy") and "initialisation" in notes["reference"]
    batch = first_batch(trainer)
    reference = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, batch))
    assert torch.allclose(reference.double(), closed_form_logps(base_model(), batch), atol=1e-4)


def test_a_method_that_wraps_the_model_is_refused(tmp_path: Path) -> None:
    from peftkit.registry import get_method

    config = get_method("prompt_tuning").config_cls(num_virtual_tokens=4)
    with pytest.raises(ConfigError, match="wraps the model"):
        built_trainer(tmp_path, config, PreferenceConfig())


def test_simpo_loss_at_start_is_its_closed_form(tmp_path: Path) -> None:
    options = PreferenceConfig(algorithm="simpo", beta=2.0, simpo_gamma=0.5)
    trainer, notes, _, _ = built_trainer(tmp_path, LORA, options)
    assert notes["reference"].startswith("none")
    batch = first_batch(trainer)  # TRL's CPO layout: chosen_* and rejected_* rows
    average = []
    for side in ("chosen", "rejected"):
        rows = {"input_ids": batch[f"{side}_input_ids"],
                "attention_mask": batch[f"{side}_attention_mask"],
                "completion_mask": (batch[f"{side}_labels"] != -100).long()}  # fmt: skip
        sums = closed_form_logps(base_model(), rows)  # the adapter is unchanged at init
        average.append(sums / rows["completion_mask"][:, 1:].sum(-1))
    # SimPO: -log sigmoid(beta * (mean log p(chosen) - mean log p(rejected)) - gamma)
    closed = float((-F.logsigmoid(2.0 * (average[0] - average[1]) - 0.5)).mean())
    loss = trainer.compute_loss(trainer.model, batch)
    assert float(loss.detach()) == pytest.approx(closed, abs=1e-4)


def test_orpo_trains_without_a_reference(tmp_path: Path) -> None:
    options = PreferenceConfig(algorithm="orpo", beta=0.1)
    trainer, notes, model, _ = built_trainer(tmp_path, LORA, options, steps=3)
    assert notes["reference"].startswith("none") and getattr(trainer, "ref_model", None) is None
    batch = first_batch(trainer)
    before = float(trainer.compute_loss(trainer.model, batch).detach())
    trainer.train()
    assert float(trainer.compute_loss(trainer.model, batch).detach()) < before


# The whole path.


def test_peftkit_train_writes_a_peft_adapter_and_summary(tmp_path: Path) -> None:
    from peft import PeftModel

    from peftkit.cli import main

    recipe = Path(__file__).parents[1] / "recipes" / "tiny-dpo-lora.yaml"
    output = tmp_path / "run"
    overrides = [f"output_dir={output}", "training.max_steps=3", "training.batch_size=8",
                 "task.max_train_examples=48", "task.max_eval_examples=16",
                 "training.threads=1"]  # fmt: skip
    with warnings.catch_warnings():  # main() sets a warnings filter: keep it to this test
        assert main(["train", str(recipe), *[a for o in overrides for a in ("--set", o)]]) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["task"] == "preference" and summary["steps"] == 3
    assert "switched off" in summary["reference"]
    assert summary["preference"] == {"algorithm": "dpo", "loss_type": "sigmoid", "beta": 0.1}
    assert set(summary["eval_after"]) == {"preference_accuracy", "logp_margin", "chosen_nll"}
    ids = torch.tensor([[70, 82, 83, 92, 29, 224, 68, 69]])
    loaded = PeftModel.from_pretrained(base_model(), str(output / "adapter")).eval()
    ours = peftkit.load(base_model(), output / "adapter").eval()
    with torch.no_grad():
        theirs_logits, ours_logits = loaded(input_ids=ids).logits, ours(input_ids=ids).logits
        base_logits = base_model()(input_ids=ids).logits
    assert torch.allclose(theirs_logits, ours_logits, atol=1e-5)
    assert (theirs_logits - base_logits).abs().max() > 1e-4  # the trained adapter acts


@pytest.mark.parametrize("algorithm", ["orpo", "simpo"])
def test_the_estimator_refuses_the_preference_steps_it_does_not_model(algorithm):
    """DPO, KTO and GRPO steps are modelled (tests/test_estimate_preference.py); ORPO's and
    SimPO's trainers score the whole logits, which the step shape does not say, so a figure
    for them would be wrong: refused by name."""
    from peftkit.errors import ConfigError
    from peftkit.memory.estimate import estimate

    with pytest.raises(ConfigError, match=f"preference.algorithm '{algorithm}'"):
        estimate("tiny-llama", "lora", 2, 16, "fp32", task="preference",
                 task_options={"algorithm": algorithm})  # fmt: skip
    assert estimate("tiny-llama", "lora", 2, 16, "fp32", task="preference").total > 0


def test_the_training_layer_picks_each_task_types_trainer() -> None:
    """training/task_trainers.py maps the objective a task record names to its builder; a type
    without one trains with PeftkitTrainer; an objective without a builder is refused by name."""
    import dataclasses

    from peftkit.tasks.types import TASK_TYPES
    from peftkit.training import grpo, kto, preference
    from peftkit.training.task_trainers import trainer_builder

    own = {"preference": preference.build_preference_trainer, "kto": kto.build_kto_trainer,
           "grpo": grpo.build_grpo_trainer}  # fmt: skip
    picked = {name: trainer_builder(task_type) for name, task_type in TASK_TYPES.items()}
    assert picked == {name: own.get(name) for name in TASK_TYPES}
    odd = dataclasses.replace(TASK_TYPES["kto"], name="made-up", trainer="made-up")
    with pytest.raises(ConfigError, match="'made-up' trains with 'made-up', which has no trainer"):
        trainer_builder(odd)
