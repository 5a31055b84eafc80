"""Preference pairs: a prompt, a chosen and a rejected response, learnt with DPO (its sigmoid,
IPO, hinge and robust losses), ORPO or SimPO on TRL's trainers (training/preference.py).

Rows come in TRL's standard formats, from JSONL, CSV, JSON or Parquet (data/files.py):

- text: `prompt`, `chosen`, `rejected` strings;
- conversational: `prompt` a list of messages ({"role", "content"}), `chosen` and `rejected`
  lists of messages (the assistant's turn);
- conversational with an implicit prompt: no prompt column, `chosen` and `rejected` whole
  conversations sharing their first messages (the prompt) and differing in the last.

A malformed row (no chosen or rejected response, chosen equal to rejected, an empty prompt) is a
`MalformedPairError` naming every such row, raised while the rows are read: before a model loads
and before anything is written. Conversations are rendered to text through peftkit's chat
rendering (chat_template.py: the tokenizer's template, or the fallback), so TRL sees the text
format, and EOS ends every response.

Evaluation needs no reference: on held-out pairs, how often the model gives the chosen response
a higher log-probability than the rejected one (`preference_accuracy`), the mean difference
(`logp_margin`), and the chosen response's per-token negative log-likelihood (`chosen_nll`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from peftkit.chat_template import render_chat
from peftkit.data.collate import pad_rows
from peftkit.data.files import is_blank, name_rows, require_columns
from peftkit.errors import ConfigError, DataError, MalformedPairError
from peftkit.tasks.base import (
    Rows,
    StepShape,
    TaskData,
    TaskType,
    require_training_features,
    section_options,
)

if TYPE_CHECKING:
    from peftkit.tasks.config import TaskConfig

Messages = list[dict[str, str]]


def _auto_class() -> Any:
    import transformers

    return transformers.AutoModelForCausalLM


def columns(task: TaskConfig) -> list[str]:
    """The chosen and rejected columns (the prompt column may be absent: an implicit prompt)."""
    return [task.chosen_column, task.rejected_column]


def as_messages(value: Any) -> Messages | None:
    """A list of {"role", "content"} messages (Parquet gives arrays), or None if it is not one."""
    if isinstance(value, str) or value is None or not hasattr(value, "__iter__"):
        return None
    if isinstance(value, dict):
        return None
    messages = list(value)
    if all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    return None


def _empty(value: Any) -> bool:
    """No text, or no message with any content."""
    messages = as_messages(value)
    if messages is not None:
        return not any(m["content"].strip() for m in messages)
    return is_blank(value)


def split_pair(task: TaskConfig, row: dict[str, Any]) -> tuple[Any, Any, Any] | str:
    """(prompt, chosen, rejected) of one row, each text or messages; or what is wrong with it."""
    chosen, rejected = row.get(task.chosen_column), row.get(task.rejected_column)
    if _empty(chosen):
        return "no chosen response"
    if _empty(rejected):
        return "no rejected response"
    chosen_messages, rejected_messages = as_messages(chosen), as_messages(rejected)
    if (chosen_messages is None) != (rejected_messages is None):
        return "chosen and rejected must both be text or both be message lists"
    if task.prompt_column in row:
        prompt = row[task.prompt_column]
        if _empty(prompt):
            return "an empty prompt"
        if as_messages(prompt) is None and not isinstance(prompt, str):
            return "a prompt that is neither text nor a list of messages"
        if as_messages(prompt) is not None and chosen_messages is None:
            return "a prompt of messages with text responses (give messages for all three)"
    elif chosen_messages is not None:  # implicit prompt: the conversations' shared start
        shared = 0
        while (
            shared < min(len(chosen_messages), len(rejected_messages)) - 1
            and chosen_messages[shared] == rejected_messages[shared]
        ):
            shared += 1
        prompt = chosen_messages[:shared]
        chosen, rejected = chosen_messages[shared:], rejected_messages[shared:]
        if _empty(prompt):
            return "an empty prompt (the conversations share no first message)"
    else:
        return f"an empty prompt (no '{task.prompt_column}' column)"
    if chosen == rejected or (
        isinstance(chosen, str) and isinstance(rejected, str) and chosen.strip() == rejected.strip()
    ):
        return "chosen equal to rejected"
    return prompt, chosen, rejected


def row_check(task: TaskConfig, rows: Rows, source: str) -> None:
    """Refuse every malformed pair of one file, naming the rows by what is wrong with them."""
    require_columns(rows, columns(task), source, values=False)
    problems: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        found = split_pair(task, row)
        if isinstance(found, str):
            problems.setdefault(found, []).append(index)
    if problems:
        said = "; ".join(f"{problem}: {name_rows(found)}" for problem, found in problems.items())
        raise MalformedPairError(
            f"{source} has preference rows that cannot be learnt from (rows count from 0): "
            f"{said}. Fix or remove them; nothing was trained or written."
        )


def _ends_with_eos(text: str, eos: str) -> str:
    """The response ending with exactly one EOS (whitespace a template adds after it dropped)."""
    stripped = text.rstrip()
    if stripped.endswith(eos):
        return stripped
    return text + eos


def text_record(task: TaskConfig, row: dict[str, Any], tokenizer: Any) -> dict[str, str]:
    """A checked row in TRL's text format: prompt, and chosen/rejected each ending with EOS.
    Conversations are rendered through the chat template; each response is the rendered
    conversation after the rendered prompt (with the generation prompt)."""
    prompt, chosen, rejected = split_pair(task, row)  # row_check has refused the malformed
    eos = tokenizer.eos_token
    if as_messages(chosen) is None:
        return {"prompt": str(prompt), "chosen": _ends_with_eos(str(chosen), eos),
                "rejected": _ends_with_eos(str(rejected), eos)}  # fmt: skip
    prompt_messages = as_messages(prompt) or [{"role": "user", "content": str(prompt)}]
    prompt_text = render_chat(prompt_messages, tokenizer, add_generation_prompt=True)
    record = {"prompt": prompt_text}
    for key, response in (("chosen", chosen), ("rejected", rejected)):
        whole = render_chat(prompt_messages + as_messages(response), tokenizer)
        if not whole.startswith(prompt_text):
            raise DataError(
                "The chat template renders a conversation's prompt differently alone than "
                "before its answer, so the response cannot be cut from it; give the pairs in the "
                "text format (prompt, chosen, rejected strings)."
            )
        record[key] = _ends_with_eos(whole[len(prompt_text) :], eos)
    return record


def _common_prefix(first: list[int], second: list[int]) -> int:
    """How many leading token ids two sequences share."""
    count = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        count += 1
    return count


def pair_feature(tokenizer: Any, record: dict[str, str], max_length: int) -> dict[str, Any] | None:
    """Token ids of prompt, chosen and rejected (as TRL cuts them: the responses start where
    the tokenised prompt and prompt + response part), each sequence kept to max_length from its
    start. None when the prompt alone fills max_length (no response token is left)."""
    prompt = tokenizer(record["prompt"])["input_ids"]
    chosen = tokenizer(record["prompt"] + record["chosen"])["input_ids"]
    rejected = tokenizer(record["prompt"] + record["rejected"])["input_ids"]
    cut = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
    if cut >= max_length:
        return None
    room = max_length - cut
    truncated = max(len(chosen), len(rejected)) > max_length
    return {"prompt_ids": prompt[:cut], "chosen_ids": chosen[cut:][:room],
            "rejected_ids": rejected[cut:][:room], "truncated": truncated}  # fmt: skip


def chosen_feature(feature: dict[str, Any]) -> dict[str, Any]:
    """The prompt and chosen response as a causal-LM feature (the loss on the response): what a
    method's data-driven preparation and the memory estimator read."""
    ids = feature["prompt_ids"] + feature["chosen_ids"]
    labels = [-100] * len(feature["prompt_ids"]) + feature["chosen_ids"]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def features_in_step(
    records: Iterable[dict[str, Any]], feature: Callable[[dict[str, Any]], dict[str, Any] | None]
) -> tuple[Rows, list[dict[str, Any]], int, int]:
    """(records kept, their features, truncated, dropped): each record's feature (a dict with a
    "truncated" flag, taken off it and counted), a record whose feature is None dropped with it."""
    kept, features, truncated, dropped = [], [], 0, 0
    for record in records:
        made = feature(record)
        if made is None:
            dropped += 1
            continue
        truncated += made.pop("truncated")
        kept.append(record)
        features.append(made)
    return kept, features, truncated, dropped


def _features(
    task: TaskConfig, tokenizer: Any, rows: Rows
) -> tuple[Rows, list[dict[str, Any]], int, int]:
    """(text records, pair features, truncated, dropped) of rows, kept in step."""
    records = (text_record(task, row, tokenizer) for row in rows)  # each read as it is featured
    return features_in_step(records, lambda r: pair_feature(tokenizer, r, task.max_length))


def prepare(task: TaskConfig, tokenizer: Any, train: Rows, held_out: Rows) -> TaskData:
    """TRL's text records and peftkit's pair features for the training and held-out rows."""
    train_records, train_pairs, truncated, dropped = _features(task, tokenizer, train)
    require_training_features(train_pairs, "a response token after the prompt", task.max_length)
    eval_records, eval_pairs, _, dropped_eval = _features(task, tokenizer, held_out)
    return TaskData(
        train=[chosen_feature(f) for f in train_pairs], eval=eval_pairs, truncated=truncated,
        dropped=dropped, dropped_eval=dropped_eval, tokenizer=tokenizer,
        max_new_tokens=task.max_new_tokens, train_records=train_records,
        eval_records=eval_records,
    )  # fmt: skip


def response_log_probs(
    model: nn.Module, features: list[dict[str, Any]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each pair's chosen and rejected response given its prompt,
    and their token counts: (chosen, rejected, chosen tokens, rejected tokens)."""
    sequences, masks = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for f in features:
            sequences.append(f["prompt_ids"] + f[key])
            masks.append([0] * len(f["prompt_ids"]) + [1] * len(f[key]))
    input_ids = pad_rows(sequences, pad_token_id, "right")
    attention = pad_rows([[1] * len(s) for s in sequences], 0, "right")
    response = pad_rows(masks, 0, "right")[:, 1:].bool()
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
    token_logps = torch.gather(F.log_softmax(logits, -1), 2, input_ids[:, 1:, None])[..., 0]
    sums = (token_logps * response).sum(-1)
    counts = response.sum(-1)
    chosen, rejected = sums.chunk(2)
    chosen_count, rejected_count = counts.chunk(2)
    return chosen, rejected, chosen_count, rejected_count


def evaluate(model: nn.Module, data: TaskData, collator: Any, batch_size: int) -> dict[str, float]:
    """Held-out pairs: how often chosen outscores rejected in log-probability, the mean margin,
    and the chosen response's per-token negative log-likelihood (no reference model needed)."""
    model.eval()
    wins, margin, nll, tokens = 0, 0.0, 0.0, 0
    pad = data.tokenizer.pad_token_id
    with torch.no_grad():
        for start in range(0, len(data.eval), batch_size):
            batch = data.eval[start : start + batch_size]
            chosen, rejected, chosen_count, _ = response_log_probs(model, batch, pad)
            wins += int((chosen > rejected).sum())
            margin += float((chosen - rejected).sum())
            nll -= float(chosen.sum())
            tokens += int(chosen_count.sum())
    pairs = max(1, len(data.eval))
    return {"preference_accuracy": wins / pairs, "logp_margin": margin / pairs,
            "chosen_nll": nll / max(1, tokens)}  # fmt: skip


def training_step(options: Any) -> StepShape:
    """DPO's step for the memory estimate: the policy over chosen and rejected (TRL's
    concatenated batch), then the reference over both while the policy's activations wait."""
    from peftkit.tasks.config import PreferenceConfig

    algorithm = section_options(PreferenceConfig, options).algorithm
    if algorithm != "dpo":
        raise ConfigError(
            f"the estimator does not model preference.algorithm {algorithm!r} yet (its trainer "
            "scores the whole logits, not TRL's fused head); it models dpo."
        )
    return StepShape(sequences=2, after=("reference",))


PREFERENCE = TaskType(
    name="preference",
    description="prompt + chosen/rejected responses; DPO (sigmoid, IPO, hinge, robust), ORPO or "
    "SimPO through TRL",
    auto_class=_auto_class,
    model_needs="a decoder-only model (GPT-2, Llama, Qwen2, SmolLM2, ...)",
    columns=columns,
    prepare=prepare,
    evaluate=evaluate,
    metric="preference_accuracy",
    metrics=("preference_accuracy", "logp_margin", "chosen_nll"),
    generates=True,
    row_check=row_check,
    trainer="preference",
    step=training_step,
)
