"""KTO (task.type: kto) on TRL's KTOTrainer: malformed unpaired rows refused by name, pairs
unpaired as TRL unpairs them, the reference is the base (the adapter switched off, closed form),
the loss against TRL's own KTOTrainer and KTO's closed form, one step moves only the adapter,
and `peftkit train` writes an adapter and summary.json."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
import trl_support
from trl_support import base_model, perturb_adapter

import peftkit
from peftkit.errors import ConfigError, MalformedExampleError, MalformedPairError
from peftkit.models import load_model
from peftkit.recipe import Recipe, TrainConfig
from peftkit.tasks.base import TrainerParts
from peftkit.tasks.config import KTOConfig, TaskConfig
from peftkit.tasks.types import get_task_type

ROWS = [  # BUILT for the tests: copying the words is desirable, reversing them is not
    {"prompt": "copy: ab cd\n", "completion": "ab cd", "label": True},
    {"prompt": "copy: e f\n", "completion": "f e", "label": False},
    {"prompt": "copy: abc d ef\n", "completion": "abc d ef", "label": True},
    {"prompt": "copy: fa b\n", "completion": "b fa", "label": False},
]
KTO = get_task_type("kto")
LORA = peftkit.LoraConfig(rank=4)
TASK = TaskConfig(type="kto", train_file="unused.jsonl", max_length=48)


def built_trainer(tmp_path: Path, method: object, options: KTOConfig, steps: int = 1):  # noqa: ANN201
    """(trainer, notes, applied model, task data) through peftkit's builder on ROWS."""
    from peftkit.training.kto import build_kto_trainer

    return trl_support.built_trainer(
        tmp_path, build_kto_trainer, TASK, ROWS, method, options, steps=steps
    )


def whole_batch(trainer) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The trainer's collated batch of every training example, in its order."""
    dataset = trainer.train_dataset
    return trainer.data_collator([dataset[i] for i in range(len(dataset))])


def closed_form_logps(model: torch.nn.Module, ids, attention, completion) -> torch.Tensor:  # noqa: ANN001
    """sum over completion tokens of log p(token | everything before it), by hand from the
    model's logits (independent of TRL's fused head)."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits
    logps = F.log_softmax(logits[:, :-1].double(), -1)
    picked = logps.gather(2, ids[:, 1:, None])[..., 0]
    return (picked * completion[:, 1:]).sum(-1)


def sides(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(completion log-probabilities, KL completions' log-probabilities) of a batch."""
    matched = closed_form_logps(
        model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    )
    mismatched = closed_form_logps(
        model, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"]
    )
    return matched, mismatched


def test_malformed_rows_are_named_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [*ROWS, {"prompt": " ", "completion": "a", "label": True},
            {"prompt": "copy: a\n", "completion": "", "label": False},
            {"prompt": "copy: b\n", "completion": "b", "label": "maybe"}]  # fmt: skip
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe, output = tmp_path / "recipe.yaml", tmp_path / "run"
    recipe.write_text(
        f"model: tiny-llama\ntask: {{type: kto, train_file: {data}, max_length: 32}}\n"
        f"method: {{name: lora, rank: 2}}\ntraining: {{max_steps: 1, batch_size: 2}}\n"
        f"output_dir: {output}\n"
    )
    from peftkit.cli import main

    with warnings.catch_warnings():  # main() sets a warnings filter: keep it to this test
        assert main(["train", str(recipe)]) == 2
    message = capsys.readouterr().err
    assert "an empty prompt: row 4" in message
    assert "an empty completion: row 5" in message
    assert "a label that is not true or false: row 6" in message
    assert not output.exists()
    with pytest.raises(MalformedExampleError, match="row 0"):
        KTO.check_rows(TASK, [{"prompt": "a", "completion": "b", "label": 2}], "rows")


def test_labels_and_pairs_read_as_trl_reads_them() -> None:
    from datasets import Dataset
    from trl.data_utils import unpair_preference_dataset

    tokenizer = load_model("tiny-llama", "causal-lm")[1]
    spelled = [{**row, "label": ("yes" if row["label"] else "0")} for row in ROWS]
    records = KTO.prepare(TASK, tokenizer, spelled, spelled).train_records
    assert [r["label"] for r in records] == [r["label"] for r in ROWS]
    assert records[0] == {"prompt": "copy: ab cd\n", "completion": "ab cd</s>", "label": True}
    pairs = [{"prompt": "copy: a b\n", "chosen": "a b", "rejected": "b a"},
             {"prompt": "copy: c d\n", "chosen": "c d", "rejected": "d c"}]  # fmt: skip
    ours = KTO.prepare(TASK, tokenizer, pairs, pairs).train_records
    theirs = list(unpair_preference_dataset(Dataset.from_list(pairs)))
    eos = tokenizer.eos_token
    key = lambda r: (r["prompt"], r["completion"].removesuffix(eos), r["label"])  # noqa: E731
    assert sorted(map(key, ours)) == sorted(map(key, theirs))
    chat = {"prompt": [{"role": "user", "content": "copy: a b"}],
            "completion": [{"role": "assistant", "content": "a b"}], "label": False}  # fmt: skip
    # peftkit's fallback template (the tiny tokenizer has none), written out by hand:
    assert KTO.prepare(TASK, tokenizer, [chat], [chat]).train_records == [
        {"prompt": "<|user|>\ncopy: a b\n<|assistant|>\n", "completion": "a b</s>", "label": False}
    ]
    with pytest.raises(MalformedPairError, match="chosen equal to rejected: row 0"):
        KTO.check_rows(TASK, [{"prompt": "p", "chosen": "x", "rejected": "x"}], "pairs")


def test_an_example_whose_prompt_fills_max_length_leaves_with_its_record() -> None:
    tokenizer = load_model("tiny-llama", "causal-lm")[1]
    task = TaskConfig(type="kto", train_file="unused.jsonl", max_length=17)
    long = {"prompt": "copy: " + " ".join("abcdefgh"[i % 8] for i in range(30)) + "\n",
            "completion": "a", "label": True}  # fmt: skip
    rows = [ROWS[0], long, *ROWS[1:]]
    data = KTO.prepare(task, tokenizer, rows, rows)
    kept = [r for r in rows if r is not long]
    assert len(tokenizer(long["prompt"])["input_ids"]) >= task.max_length  # it must go
    assert data.dropped == data.dropped_eval == 1
    assert [(r["prompt"], r["label"]) for r in data.train_records] == [
        (r["prompt"], r["label"]) for r in kept
    ]
    for record, feature in zip(data.eval_records, data.eval, strict=True):  # in step
        whole = tokenizer(record["prompt"] + record["completion"])["input_ids"]
        assert feature["prompt_ids"] + feature["completion_ids"] == whole[: task.max_length]
        assert feature["label"] == record["label"]
    lengths = [len(tokenizer(r["prompt"] + r["completion"])["input_ids"])
               for r in data.train_records]  # fmt: skip
    assert data.truncated == sum(n > task.max_length for n in lengths) > 0


def test_kto_section_only_with_a_kto_task() -> None:
    from peftkit.recipe import recipe_from_dict, recipe_to_dict

    with pytest.raises(ConfigError, match="task.type: kto"):
        recipe_from_dict({"task": {"dataset": "copy-preferences", "type": "preference"},
                          "kto": {"beta": 0.2}})  # fmt: skip
    with pytest.raises(ConfigError, match="Did you mean 'kto'"):
        KTOConfig(loss_type="kt")
    with pytest.raises(ConfigError, match="desirable_weight must be > 0"):
        KTOConfig(desirable_weight=0)
    recipe = recipe_from_dict({"task": {"dataset": "copy-preferences", "type": "kto"},
                               "kto": {"beta": 0.2, "undesirable_weight": 1.5}})  # fmt: skip
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe


def test_batch_of_one_is_refused_by_name(tmp_path: Path) -> None:
    from peftkit.training.kto import kto_options

    recipe = Recipe(model="tiny-llama", task=TASK, training=TrainConfig(batch_size=1))
    parts = TrainerParts(recipe, None, None, None, {}, [], None, resumed=False)
    with pytest.raises(ConfigError, match="training.batch_size to 2 or more"):
        kto_options(parts)


def test_reference_is_the_base_and_the_loss_is_trls_and_the_closed_form(tmp_path: Path) -> None:
    from trl import KTOConfig as TRLConfig
    from trl import KTOTrainer

    beta = 0.1
    trainer, notes, model, data = built_trainer(tmp_path, LORA, KTOConfig(beta=beta))
    assert "switched off" in notes["reference"] and "reference_copy_mib" not in notes
    assert not list(trainer.ref_model.parameters())  # no second copy of any weight
    perturb_adapter(model)  # the policy now differs from the base; the reference must not
    batch = whole_batch(trainer)
    reference, reference_kl = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    base, base_kl = sides(base_model(), batch)
    assert torch.allclose(reference.double(), base, atol=1e-4)
    assert torch.allclose(reference_kl.double(), base_kl, atol=1e-4)
    ours = float(trainer.compute_loss(trainer.model, batch).detach())
    # TRL's own KTOTrainer, untouched, on a copy of the same policy and the base as reference.
    twin = peftkit.apply(base_model(), LORA)
    twin.load_state_dict(model.state_dict())
    from datasets import Dataset

    stock = KTOTrainer(
        model=twin, ref_model=base_model(), processing_class=data.tokenizer,
        train_dataset=Dataset.from_list(data.train_records),
        args=TRLConfig(output_dir=str(tmp_path / "stock"), use_cpu=True, bf16=False,
                       gradient_checkpointing=False, report_to="none", max_length=48, beta=beta,
                       per_device_train_batch_size=4),
    )  # fmt: skip
    theirs = float(stock.compute_loss(stock.model, batch).detach())
    # KTO (Ethayarajh et al., eq. 7 as TRL writes it), by hand.
    policy, policy_kl = sides(model, batch)
    kl = (policy_kl - base_kl).mean().clamp(min=0)
    ratio, desirable = policy - base, batch["label"].bool()
    losses = torch.cat([1 - torch.sigmoid(beta * (ratio[desirable] - kl)),
                        1 - torch.sigmoid(beta * (kl - ratio[~desirable]))])  # fmt: skip
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert ours == pytest.approx(float(losses.mean()), abs=1e-4)
    assert abs(ours - 0.5) > 1e-3  # the perturbed adapter moved the loss off its start, 0.5


def test_one_kto_step_moves_only_the_adapter_and_reads_rows_in_order(tmp_path: Path) -> None:
    trainer, _, model, _ = built_trainer(tmp_path, LORA, KTOConfig())
    assert list(trainer._get_train_sampler()) == [0, 1, 2, 3]  # KL pairs need dataset order
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in name for name in changed)
    assert any("lora_B" in name for name in changed)


def test_a_method_without_switch_off_gets_a_frozen_copy(tmp_path: Path) -> None:
    from peftkit.registry import get_method

    trainer, notes, model, _ = built_trainer(tmp_path, get_method("full").config_cls(), KTOConfig())
    assert notes["reference"].startswith("a frozen copy") and notes["reference_copy_mib"] > 0
    trainer.train()  # the policy's own weights move; the copy must not
    batch = whole_batch(trainer)
    reference, _ = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    base, _ = sides(base_model(), batch)
    assert torch.allclose(reference.double(), base, atol=1e-4)
    assert (sides(model, batch)[0] - base).abs().max() > 1e-3


def test_peftkit_train_writes_an_adapter_and_summary(tmp_path: Path) -> None:
    from peftkit.cli import main

    recipe = Path(__file__).parents[1] / "recipes" / "tiny-kto-lora.yaml"
    output = tmp_path / "run"
    overrides = [f"output_dir={output}", "training.max_steps=2", "training.batch_size=8",
                 "task.max_train_examples=16", "task.max_eval_examples=8",
                 "training.threads=1"]  # fmt: skip
    with warnings.catch_warnings():  # main() sets a warnings filter: keep it to this test
        assert main(["train", str(recipe), *[a for o in overrides for a in ("--set", o)]]) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["task"] == "kto" and summary["steps"] == 2
    assert summary["train_examples"] == 32  # 16 pairs, unpaired
    assert "switched off" in summary["reference"]
    assert set(summary["eval_after"]) == {"nll_gap", "desirable_nll", "undesirable_nll"}
    loaded = peftkit.load(base_model(), output / "adapter").eval()
    ids = torch.tensor([[70, 82, 83, 92, 29, 224, 68, 69]])
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - base_model()(input_ids=ids).logits).abs().max() > 0
