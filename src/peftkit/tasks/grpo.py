"""Prompts and reward functions: group-relative policy optimisation (GRPO) on TRL's
GRPOTrainer (training/grpo.py). The model samples a group of completions per prompt; each is
scored by the task's rewards (`task.rewards`, tasks/rewards.py) and learnt from by its advantage
over its group.

Rows come in TRL's prompt-only format, from JSONL, CSV, JSON or Parquet: `prompt` as text or a
list of messages (rendered through peftkit's chat rendering with the generation prompt, so TRL
sees text). Every other column travels with its prompt to the reward functions (the
Text-to-SQL reward reads `sql`, the gold query). A row with an empty prompt, or a column whose
name the reward call itself uses, is a `MalformedExampleError` naming the rows.

Prompts are not cut to task.max_length (TRL 1.16's GRPOTrainer has no prompt limit); each
completion is limited by grpo.max_completion_length.

Evaluation: greedy completions of the held-out prompts (task.max_new_tokens), scored by the same
rewards (given completion_ids as in training, not TRL's trainer_state or log functions):
`mean_reward` (their weighted sum, averaged) and each reward's mean (`reward/NAME`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from peftkit.chat_template import render_chat
from peftkit.data.files import name_rows, require_columns
from peftkit.errors import MalformedExampleError
from peftkit.tasks.base import (
    Rows,
    StepShape,
    TaskData,
    TaskType,
    require_training_features,
    section_options,
)
from peftkit.tasks.preference import _auto_class, _empty, as_messages
from peftkit.tasks.rewards import task_rewards

if TYPE_CHECKING:
    from peftkit.tasks.config import TaskConfig

# Keyword names the reward call uses itself: a data column may not take them.
RESERVED = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra",
            "log_metric", "environments", "completion")  # fmt: skip


def columns(task: TaskConfig) -> list[str]:
    """The prompt column (every other column goes to the rewards)."""
    return [task.prompt_column]


def row_check(task: TaskConfig, rows: Rows, source: str) -> None:
    """Refuse rows with an empty prompt, and columns named as the reward call's own arguments."""
    require_columns(rows, columns(task), source, values=False)
    reserved = sorted({key for row in rows for key in row if key in RESERVED})
    if reserved:
        raise MalformedExampleError(
            f"{source} has columns named {', '.join(reserved)}, which the reward functions' call "
            "uses itself; rename them. Nothing was trained or written."
        )
    empty = [i for i, row in enumerate(rows) if _empty(row.get(task.prompt_column))]
    odd = [
        i for i, row in enumerate(rows)
        if i not in empty and not isinstance(row[task.prompt_column], str)
        and as_messages(row[task.prompt_column]) is None
    ]  # fmt: skip
    said = [f"an empty prompt: {name_rows(empty)}"] if empty else []
    said += (
        [f"a prompt that is neither text nor a list of messages: {name_rows(odd)}"] if odd else []
    )
    if said:
        raise MalformedExampleError(
            f"{source} has GRPO rows that cannot be learnt from (rows count from 0): "
            f"{'; '.join(said)}. Fix or remove them; nothing was trained or written."
        )


def prompt_record(task: TaskConfig, row: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """A row as TRL's prompt-only record: the prompt as text, the other columns as they are."""
    prompt = row[task.prompt_column]
    messages = as_messages(prompt)
    text = render_chat(messages, tokenizer, add_generation_prompt=True) if messages else prompt
    others = {key: value for key, value in row.items() if key != task.prompt_column}
    return {**others, "prompt": str(text)}


def prompt_feature(tokenizer: Any, record: dict[str, Any]) -> dict[str, Any]:
    """The prompt's tokens as a causal-LM feature: what a method's data-driven preparation, the
    first forward and the memory estimator read, and what evaluation continues. Whole: TRL's
    GRPOTrainer (1.16) does not cut prompts, so neither does peftkit."""
    ids = tokenizer(record["prompt"])["input_ids"]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


def prepare(task: TaskConfig, tokenizer: Any, train: Rows, held_out: Rows) -> TaskData:
    """TRL's prompt records, the prompts' features, and the task's reward functions."""
    rewards = task_rewards(task)  # an unknown or unimportable reward: refused before training
    train_records = [prompt_record(task, row, tokenizer) for row in train]
    eval_records = [prompt_record(task, row, tokenizer) for row in held_out]
    features = [prompt_feature(tokenizer, r) for r in train_records]
    require_training_features(features, "a prompt token", task.max_length)
    return TaskData(
        train=features, eval=[prompt_feature(tokenizer, r) for r in eval_records],
        tokenizer=tokenizer, max_new_tokens=task.max_new_tokens, train_records=train_records,
        eval_records=eval_records, rewards=rewards,
    )  # fmt: skip


def score(
    rewards: tuple[list[Any], list[float]], records: Rows, completions: list[str], **extra: Any
) -> dict[str, float]:
    """The rewards of completions of records' prompts (extra: more keyword lists, such as
    completion_ids): their weighted sum's mean, and each reward's mean."""
    functions, weights = rewards
    count = max(1, len(records))
    keys = [key for key in records[0] if key != "prompt"] if records else []
    columns = {key: [record.get(key) for record in records] for key in keys}
    prompts = [record["prompt"] for record in records]
    totals = [0.0] * len(records)
    report: dict[str, float] = {}
    for function, weight in zip(functions, weights, strict=True):
        values = function(prompts=prompts, completions=completions, **columns, **extra)
        report[f"reward/{function.name}"] = sum(values) / count
        totals = [total + weight * value for total, value in zip(totals, values, strict=True)]
    return {"mean_reward": sum(totals) / count, **report}


def evaluate(model: nn.Module, data: TaskData, collator: Any, batch_size: int) -> dict[str, float]:
    """Greedy completions of the held-out prompts, scored by the task's rewards."""
    from peftkit.decoding.generate import generate

    prompts = [feature["input_ids"] for feature in data.eval]
    generated = generate(
        model, data.tokenizer, prompts, max_new_tokens=data.max_new_tokens, batch_size=batch_size
    )
    texts, ids = [g.text for g in generated], [g.token_ids for g in generated]
    return score(data.rewards, data.eval_records, texts, completion_ids=ids)


def training_step(options: Any) -> StepShape:
    """GRPO's step for the memory estimate (TRL 1.16's GRPOTrainer): the rollouts (prompt +
    max_completion_length tokens each), the reference over them without gradient when beta > 0,
    then the policy over prompt + completion."""
    from peftkit.tasks.config import GRPOConfig

    options = section_options(GRPOConfig, options)
    before = ("reference",) if options.beta > 0 else ()
    return StepShape(before=before, generated=options.max_completion_length)


GRPO = TaskType(
    name="grpo",
    description="prompts + reward functions; GRPO (group-relative policy optimisation) through TRL",
    auto_class=_auto_class,
    model_needs="a decoder-only model (GPT-2, Llama, Qwen2, SmolLM2, ...)",
    columns=columns,
    prepare=prepare,
    evaluate=evaluate,
    metric="mean_reward",
    metrics=("mean_reward",),
    generates=True,
    row_check=row_check,
    trainer="grpo",
    step=training_step,
)
