"""Unpaired preference examples: a prompt, a completion and a label saying whether the completion
is desirable, learnt with KTO on TRL's KTOTrainer (training/kto.py).

Rows come in TRL's unpaired format, from JSONL, CSV, JSON or Parquet (data/files.py): `prompt`
and `completion` as text, or as lists of messages (the prompt's turns; the assistant's turn), and
`label` true or false (also 1/0, "true"/"false", "yes"/"no"). A malformed row (an empty prompt
or completion, a label that is neither) is a `MalformedExampleError` naming every such row,
raised while the rows are read: before a model loads and before anything is written. Paired
rows (prompt/chosen/rejected, no completion column: the preference task's formats) are unpaired
as TRL unpairs them, chosen desirable and rejected undesirable, after the preference task's own
checks (`MalformedPairError`).
Conversations are rendered to text through peftkit's chat rendering, so TRL sees the text
format, and EOS ends every completion.

Evaluation needs no reference: on held-out examples, the per-token negative log-likelihood of
the desirable and of the undesirable completions, and the gap between them (undesirable minus
desirable: higher is better), `nll_gap`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from peftkit.chat_template import render_chat
from peftkit.data.collate import pad_rows
from peftkit.data.files import name_rows, require_columns
from peftkit.errors import DataError, MalformedExampleError
from peftkit.tasks import preference
from peftkit.tasks.base import (
    Rows,
    StepShape,
    TaskData,
    TaskType,
    require_training_features,
    section_options,
)
from peftkit.tasks.preference import (
    _auto_class,
    _common_prefix,
    _empty,
    _ends_with_eos,
    as_messages,
    features_in_step,
)

if TYPE_CHECKING:
    from peftkit.tasks.config import TaskConfig

TRUE = ("true", "yes", "1", "1.0")
FALSE = ("false", "no", "0", "0.0")


def columns(task: TaskConfig) -> list[str]:
    """The prompt, completion and label columns."""
    return [task.prompt_column, task.completion_column, task.label_column]


def as_label(value: Any) -> bool | None:
    """A label as a bool, or None when it is not a yes/no value."""
    if isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", "") == "b":
        return bool(value)  # numpy's bool too
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    return None


def problem(task: TaskConfig, row: dict[str, Any]) -> str | None:
    """What is wrong with one row, or None."""
    prompt, completion = row.get(task.prompt_column), row.get(task.completion_column)
    if _empty(prompt):
        return "an empty prompt"
    if _empty(completion):
        return "an empty completion"
    if as_label(row.get(task.label_column)) is None:
        return "a label that is not true or false"
    if (as_messages(prompt) is None) != (as_messages(completion) is None):
        return "a prompt and completion not both text or both message lists"
    return None


def paired(task: TaskConfig, rows: Rows) -> bool:
    """Whether rows are preference pairs (chosen and rejected, no completion column)."""
    first = rows[0] if rows else {}
    return task.completion_column not in first and task.chosen_column in first


def row_check(task: TaskConfig, rows: Rows, source: str) -> None:
    """Refuse every malformed row of one file, naming the rows by what is wrong with them."""
    if paired(task, rows):
        preference.row_check(task, rows, source)
        return
    require_columns(rows, columns(task), source, values=False)
    problems: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        found = problem(task, row)
        if found is not None:
            problems.setdefault(found, []).append(index)
    if problems:
        said = "; ".join(f"{what}: {name_rows(found)}" for what, found in problems.items())
        raise MalformedExampleError(
            f"{source} has KTO rows that cannot be learnt from (rows count from 0): {said}. "
            "Fix or remove them; nothing was trained or written."
        )


def text_record(task: TaskConfig, row: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """A checked row in TRL's unpaired text format: prompt, completion ending with EOS, label."""
    prompt, completion = row[task.prompt_column], row[task.completion_column]
    label = as_label(row[task.label_column])
    eos = tokenizer.eos_token
    if as_messages(completion) is None:
        return {"prompt": str(prompt), "completion": _ends_with_eos(str(completion), eos),
                "label": label}  # fmt: skip
    prompt_messages = as_messages(prompt)
    prompt_text = render_chat(prompt_messages, tokenizer, add_generation_prompt=True)
    whole = render_chat(prompt_messages + as_messages(completion), tokenizer)
    if not whole.startswith(prompt_text):
        raise DataError(
            "The chat template renders a conversation's prompt differently alone than before its "
            "answer, so the completion cannot be cut from it; give the rows in the text format."
        )
    completion_text = _ends_with_eos(whole[len(prompt_text) :], eos)
    return {"prompt": prompt_text, "completion": completion_text, "label": label}


def example_feature(
    tokenizer: Any, record: dict[str, Any], max_length: int
) -> dict[str, Any] | None:
    """Token ids of prompt and completion (cut where TRL cuts them: where the tokenised prompt
    and prompt + completion part), kept to max_length from the start; None when the prompt alone
    fills max_length."""
    prompt = tokenizer(record["prompt"])["input_ids"]
    whole = tokenizer(record["prompt"] + record["completion"])["input_ids"]
    cut = _common_prefix(prompt, whole)
    if cut >= max_length:
        return None
    return {"prompt_ids": prompt[:cut], "completion_ids": whole[cut:][: max_length - cut],
            "label": record["label"], "truncated": len(whole) > max_length}  # fmt: skip


def training_feature(feature: dict[str, Any]) -> dict[str, Any]:
    """The prompt and completion as a causal-LM feature (the loss on the completion): what a
    method's data-driven preparation and the memory estimator read."""
    ids = feature["prompt_ids"] + feature["completion_ids"]
    labels = [-100] * len(feature["prompt_ids"]) + feature["completion_ids"]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def text_records(task: TaskConfig, rows: Rows, tokenizer: Any) -> Rows:
    """Checked rows as TRL's unpaired text records; a pair gives its chosen response (desirable)
    and its rejected one (undesirable), as TRL's unpair_preference_dataset does."""
    if not paired(task, rows):
        return [text_record(task, row, tokenizer) for row in rows]
    records = []
    for row in rows:
        pair = preference.text_record(task, row, tokenizer)
        records.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        records.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return records


def _features(task: TaskConfig, tokenizer: Any, rows: Rows) -> tuple[Rows, Rows, int, int]:
    """(text records, features, truncated, dropped) of rows, kept in step."""
    records = text_records(task, rows, tokenizer)
    return features_in_step(records, lambda r: example_feature(tokenizer, r, task.max_length))


def prepare(task: TaskConfig, tokenizer: Any, train: Rows, held_out: Rows) -> TaskData:
    """TRL's unpaired text records and peftkit's features for the training and held-out rows."""
    train_records, train_features, truncated, dropped = _features(task, tokenizer, train)
    require_training_features(
        train_features, "a completion token after the prompt", task.max_length
    )
    eval_records, eval_features, _, dropped_eval = _features(task, tokenizer, held_out)
    return TaskData(
        train=[training_feature(f) for f in train_features], eval=eval_features,
        truncated=truncated, dropped=dropped, dropped_eval=dropped_eval, tokenizer=tokenizer,
        max_new_tokens=task.max_new_tokens, train_records=train_records,
        eval_records=eval_records,
    )  # fmt: skip


def completion_log_probs(
    model: nn.Module, features: list[dict[str, Any]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each completion given its prompt, and its token count."""
    sequences = [f["prompt_ids"] + f["completion_ids"] for f in features]
    masks = [[0] * len(f["prompt_ids"]) + [1] * len(f["completion_ids"]) for f in features]
    input_ids = pad_rows(sequences, pad_token_id, "right")
    attention = pad_rows([[1] * len(s) for s in sequences], 0, "right")
    completion = pad_rows(masks, 0, "right")[:, 1:].bool()
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
    token_logps = torch.gather(F.log_softmax(logits, -1), 2, input_ids[:, 1:, None])[..., 0]
    return (token_logps * completion).sum(-1), completion.sum(-1)


def evaluate(model: nn.Module, data: TaskData, collator: Any, batch_size: int) -> dict[str, float]:
    """Held-out examples: the per-token NLL of desirable and of undesirable completions, and the
    gap (undesirable minus desirable; 0 when the held-out rows lack either kind)."""
    model.eval()
    nll = {True: 0.0, False: 0.0}
    tokens = {True: 0, False: 0}
    with torch.no_grad():
        for start in range(0, len(data.eval), batch_size):
            batch = data.eval[start : start + batch_size]
            sums, counts = completion_log_probs(model, batch, data.tokenizer.pad_token_id)
            for feature, total, count in zip(batch, sums.tolist(), counts.tolist(), strict=True):
                nll[feature["label"]] -= total
                tokens[feature["label"]] += count
    desirable = nll[True] / tokens[True] if tokens[True] else 0.0
    undesirable = nll[False] / tokens[False] if tokens[False] else 0.0
    gap = undesirable - desirable if tokens[True] and tokens[False] else 0.0
    return {"nll_gap": gap, "desirable_nll": desirable, "undesirable_nll": undesirable}


def training_step(options: Any) -> StepShape:
    """KTO's step for the memory estimate (TRL 1.16's KTOTrainer): with the KL term, the policy
    over the batch's mismatched pairs without gradient; the policy over the batch; then the
    reference over the KL pairs and over the batch while the policy's activations wait."""
    from peftkit.tasks.config import KTOConfig

    if section_options(KTOConfig, options).loss_type == "kto":
        return StepShape(before=("policy",), after=("reference", "reference"))
    return StepShape(after=("reference",))


KTO = TaskType(
    name="kto",
    description="prompt + completion + desirable/undesirable label; KTO through TRL",
    auto_class=_auto_class,
    model_needs="a decoder-only model (GPT-2, Llama, Qwen2, SmolLM2, ...)",
    columns=columns,
    prepare=prepare,
    evaluate=evaluate,
    metric="nll_gap",
    metrics=("nll_gap", "desirable_nll", "undesirable_nll"),
    generates=True,
    row_check=row_check,
    trainer="kto",
    step=training_step,
)
