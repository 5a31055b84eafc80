"""Causal LM (supervised fine-tuning): prompt + response + EOS, the loss on the response and its
EOS only; scored by that loss and its perplexity on held-out pairs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftkit.tasks.base import Rows, TaskData, TaskType, prepare_pairs, token_loss

if TYPE_CHECKING:
    from peftkit.tasks.config import TaskConfig


def _auto_class() -> Any:
    import transformers

    return transformers.AutoModelForCausalLM


def columns(task: TaskConfig) -> list[str]:
    """The prompt and response columns."""
    return [task.prompt_column, task.response_column]


def prompt_response_feature(
    tokenizer: Any, prompt: str, response: str, max_length: int
) -> dict[str, Any] | None:
    """Causal-LM features: prompt + response + EOS, with the loss on the response (and EOS) only.

    Returns None when truncation leaves no response token to learn from."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    # EOS is learnt, so the tuned model stops (a known failure of SFT without it).
    response_ids = response_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
    if all(label == -100 for label in labels):
        return None
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def prepare(task: TaskConfig, tokenizer: Any, train: Rows, held_out: Rows) -> TaskData:
    """Prompt/response features for training and held-out rows."""
    return prepare_pairs(
        task, CAUSAL_LM, tokenizer, train, held_out, prompt_response_feature, "a response token"
    )


CAUSAL_LM = TaskType(
    name="causal-lm",
    description="prompt -> response; the loss on the response and its EOS",
    auto_class=_auto_class,
    model_needs="a decoder-only model (GPT-2, Llama, Qwen2, SmolLM2, ...)",
    columns=columns,
    prepare=prepare,
    evaluate=token_loss,
    metric="eval_loss",
    metrics=("eval_loss", "perplexity"),
    loss_per_token=True,
    generates=True,
)
