"""Chat: conversations rendered through the tokenizer's chat template, the loss on assistant
turns only; scored by that loss on held-out conversations. Generation renders prompts the same way.

Masking renders the conversation prefix by prefix: an assistant turn's text is what rendering
through that turn adds after rendering up to it with the generation prompt. Token offsets then
map that text to tokens, so any template works without `{% generation %}` markers. The labels of
each assistant turn end with the template's end-of-turn token, so the tuned model learns to stop;
a template that does not close assistant turns with a special token is refused.

Rendering itself (the tokenizer's template, or peftkit's fallback for tokenizers without one)
is in chat_template.py, which decoding uses too."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from peftkit.chat_template import render_chat
from peftkit.errors import DataError
from peftkit.tasks.base import Features, Rows, TaskData, TaskType, generative_data, token_loss
from peftkit.tasks.conversations import Message, to_messages, validate_messages

if TYPE_CHECKING:
    from peftkit.tasks.config import TaskConfig

Feature = dict[str, list[int]]


def _auto_class() -> Any:
    import transformers

    return transformers.AutoModelForCausalLM


def assistant_spans(messages: list[Message], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn's output."""
    text = render_chat(messages, tokenizer)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(messages[:index], tokenizer, add_generation_prompt=True)
        through = render_chat(messages[: index + 1], tokenizer)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(
                "The chat template renders earlier turns differently once later turns follow, "
                "so assistant turns cannot be located for the loss mask. Use a template that "
                "renders a conversation prefix by prefix (most do), or FALLBACK_CHAT_TEMPLATE."
            )
        # Whitespace after the end-of-turn token is layout, not something the model must say.
        spans.append((len(before), len(through.rstrip())))
    return text, spans


def _special_ids(tokenizer: Any) -> set[int]:
    """Ids of every special token (eos and the template's turn markers)."""
    ids = set(tokenizer.all_special_ids)
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(index for index, token in decoder.items() if getattr(token, "special", False))
    return ids


def chat_feature(
    messages: list[Message], tokenizer: Any, max_length: int | None = None
) -> Feature | None:
    """input_ids, attention_mask and labels (-100 outside assistant output) for one conversation.

    Returns None when truncation leaves no assistant token to learn from."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            "Loss masking needs a fast tokenizer (offsets); load it with use_fast=True."
        )
    messages = validate_messages(messages)
    text, spans = assistant_spans(messages, tokenizer)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [-100] * len(ids)
    special = _special_ids(tokenizer)
    for start, end in spans:
        inside = [i for i, (s, _) in enumerate(encoded["offset_mapping"]) if start <= s < end]
        if not inside or ids[inside[-1]] not in special:
            raise DataError(
                f"The chat template ends an assistant turn with {text[start:end][-20:]!r}, not "
                "with an end-of-turn token, so a tuned model would not learn to stop. Use a "
                "template that closes assistant turns with a special token such as eos."
            )
        for i in inside:
            labels[i] = ids[i]
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == -100 for label in labels):
        return None
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def conversation_features(
    rows: Rows, tokenizer: Any, max_length: int, source: str
) -> tuple[Features, int, int]:
    """Chat features of every record (any supported format): (features, truncated, dropped)."""
    features, truncated, dropped = [], 0, 0
    for index, row in enumerate(rows):
        # to_messages names the row and turn of a bad record (unknown role, no final answer).
        feature = chat_feature(to_messages(row, f"{source}, row {index}"), tokenizer, max_length)
        if feature is None:
            dropped += 1
            continue
        truncated += len(feature["input_ids"]) >= max_length
        features.append(feature)
    return features, truncated, dropped


def chat_features(
    conversations: list[list[Message]], tokenizer: Any, max_length: int | None = None
) -> list[Feature]:
    """Features for many conversations; warns how many truncation left with nothing to learn."""
    features = [chat_feature(messages, tokenizer, max_length) for messages in conversations]
    kept = [feature for feature in features if feature is not None]
    if not kept:
        raise DataError(
            f"No conversation keeps an assistant token within max_length={max_length}; raise it."
        )
    if len(kept) < len(features):
        warnings.warn(
            f"{len(features) - len(kept)} of {len(features)} conversations lost every assistant "
            f"token to max_length={max_length} and were dropped.",
            stacklevel=2,
        )
    return kept


def end_of_turn_token_id(tokenizer: Any) -> int:
    """The token that closes an assistant turn: pass it to generate() as eos_token_id."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    feature = chat_feature(probe, tokenizer)
    assert feature is not None  # no truncation, so the answer is there
    return [label for label in feature["labels"] if label != -100][-1]


def prompt_and_answer(messages: list[Message], tokenizer: Any) -> tuple[str, str]:
    """For evaluation: everything before the last answer (with the generation prompt), and it."""
    messages = validate_messages(messages)
    prompt = render_chat(messages[:-1], tokenizer, add_generation_prompt=True)
    return prompt, messages[-1]["content"]


def prepare(task: TaskConfig, tokenizer: Any, train: Rows, held_out: Rows) -> TaskData:
    """Conversations (chat, Alpaca, ShareGPT or prompt/response records) through the chat
    template, with the loss on assistant turns only."""
    train_features, truncated, dropped = conversation_features(
        train, tokenizer, task.max_length, "training data"
    )
    eval_features, _, _ = conversation_features(
        held_out, tokenizer, task.max_length, "held-out data"
    )
    for features, what in ((train_features, "training"), (eval_features, "held-out")):
        if not features:
            raise DataError(
                f"No {what} conversation keeps an assistant token within "
                f"max_length={task.max_length}; raise task.max_length."
            )
    return generative_data(task, tokenizer, train_features, eval_features, truncated, dropped)


CHAT = TaskType(
    name="chat",
    description="conversations through the chat template; the loss on assistant turns",
    auto_class=_auto_class,
    model_needs="a decoder-only model (GPT-2, Llama, Qwen2, SmolLM2, ...)",
    columns=lambda task: [],  # each record's own format says where its turns are
    prepare=prepare,
    evaluate=token_loss,
    metric="eval_loss",
    metrics=("eval_loss", "perplexity"),
    loss_per_token=True,
    generates=True,
    chat=True,
)
