"""Sequence to sequence: an encoder reads the source, the decoder writes the target; scored by
greedy generation (exact match, token F1, ROUGE-L) and the target-token loss."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from peftkit.tasks.base import Rows, TaskData, TaskType, prepare_pairs, token_loss

if TYPE_CHECKING:
    from peftkit.tasks.config import TaskConfig


def _auto_class() -> Any:
    import transformers

    return transformers.AutoModelForSeq2SeqLM


def columns(task: TaskConfig) -> list[str]:
    """The source and target columns."""
    return [task.source_column, task.target_column]


def seq2seq_feature(tokenizer: Any, source: str, target: str, max_length: int) -> dict[str, Any]:
    """Encoder input from the source, decoder labels from the target (with EOS); both truncated
    to max_length, and the feature says whether either was (the run counts them)."""
    source_ids = tokenizer(source)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    ids = source_ids[:max_length]
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": target_ids[: max_length - 1] + [tokenizer.eos_token_id],
        "reference": target,
        "truncated": len(source_ids) > max_length or len(target_ids) > max_length - 1,
    }


def prepare(task: TaskConfig, tokenizer: Any, train: Rows, held_out: Rows) -> TaskData:
    """Source/target features for training and held-out rows."""
    return prepare_pairs(task, SEQ2SEQ, tokenizer, train, held_out, seq2seq_feature,
                         "a target token")  # fmt: skip


def generation_scores(
    model: nn.Module, data: TaskData, collator: Any, batch_size: int
) -> dict[str, float]:
    """Greedy generation from each source, scored against its reference text; plus the loss."""
    from peftkit.decoding.generate import generate
    from peftkit.metrics import score_texts

    sources = [feature["input_ids"] for feature in data.eval]
    generated = generate(
        model, data.tokenizer, sources, max_new_tokens=data.max_new_tokens, batch_size=batch_size
    )
    predictions = [g.text for g in generated]
    references = [feature["reference"] for feature in data.eval]
    return {**score_texts(predictions, references), **token_loss(model, data, collator, batch_size)}


SEQ2SEQ = TaskType(
    name="seq2seq",
    description="source -> target through an encoder-decoder",
    auto_class=_auto_class,
    model_needs="an encoder-decoder model (T5, BART, ...)",
    columns=columns,
    prepare=prepare,
    evaluate=generation_scores,
    metric="exact_match",
    metrics=("exact_match", "token_f1", "rouge_l", "eval_loss", "perplexity"),
    generates=True,
)
