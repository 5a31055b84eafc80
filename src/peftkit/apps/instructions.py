"""Instruction data: chat, Alpaca, ShareGPT and prompt/response records as one messages format,
rendered with the tokenizer's chat template, with the loss on assistant turns only.

Masking renders the conversation prefix by prefix: an assistant turn's text is what rendering
through that turn adds after rendering up to it with the generation prompt. Token offsets then
map that text to tokens, so any template works without `{% generation %}` markers. The labels of
each assistant turn end with the template's end-of-turn token, so the tuned model learns to stop;
a template that does not close assistant turns with a special token is refused.

Tokenizers without a chat template (peftkit's tiny byte-level test tokenizer, base models) get
FALLBACK_CHAT_TEMPLATE:

    <|system|>
    {system}
    <|user|>
    {user}
    <|assistant|>
    {assistant}{eos_token}

The bundled set is the English part of chatterbot-corpus 1.3.3 (BSD): small real dialogues on
21 topics, read from its YAML files without importing the package."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
import warnings
from pathlib import Path
from typing import Any

from peftkit.errors import DataError

Message = dict[str, str]
Feature = dict[str, list[int]]
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant"}
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
FORMATS_HELP = (
    'use one of: {"messages": [{"role": ..., "content": ...}, ...]}, '
    '{"instruction", "input" (optional), "output"} (Alpaca), '
    '{"conversations": [{"from": "human"|"gpt", "value": ...}]} (ShareGPT), {"prompt", "response"}'
)

# --- records to messages ----------------------------------------------------------------------


def _missing(value: Any) -> bool:
    """Whether a field is absent: None, NaN (pandas' empty cell) or blank text."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _as_list(value: Any, where: str) -> list[Any]:
    """A list of turns from a list, a JSON string (CSV cells) or an array (Parquet cells)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{where}: the messages text is not valid JSON ({error.msg})."
            ) from None
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{where}: messages must be a non-empty list of turns.")
    return list(value)


def validate_messages(messages: list[Any], where: str = "conversation") -> list[Message]:
    """Check roles and turn order; a clean list of {"role", "content"} dicts."""
    clean: list[Message] = []
    for number, turn in enumerate(messages):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise DataError(f"{where}, turn {number}: a turn needs 'role' and 'content' fields.")
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            raise DataError(
                f"{where}, turn {number}: unknown role {role!r}; roles are {', '.join(ROLES)}."
            )
        if not isinstance(content, str):
            raise DataError(f"{where}, turn {number}: content must be text, not {content!r}.")
        clean.append({"role": role, "content": content})
    body = clean[1:] if clean and clean[0]["role"] == "system" else clean
    for number, turn in enumerate(body):
        expected = "user" if number % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise DataError(
                f"{where}: turns must go (system), user, assistant, user, ...; found "
                f"{turn['role']!r} where {expected!r} belongs (a system turn only comes first)."
            )
    if not body or body[-1]["role"] != "assistant" or _missing(body[-1]["content"]):
        raise DataError(f"{where}: the conversation has no final assistant answer to learn.")
    return clean


def _text(value: Any) -> Any:
    """A number as text (a CSV column of numbers reads as ints); anything else unchanged."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _alpaca(record: dict[str, Any], where: str) -> list[Any]:
    """Alpaca instruction/input/output as a user turn and an assistant turn."""
    if _missing(record.get("instruction")):
        raise DataError(f"{where}: the 'instruction' is empty.")
    if _missing(record.get("output")):
        raise DataError(f"{where}: the 'output' (the answer) is missing or empty.")
    question = str(record["instruction"])
    if not _missing(record.get("input")):
        question = f"{question}\n\n{record['input']}"
    turns = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": _text(record["output"])},
    ]
    if not _missing(record.get("system")):
        turns.insert(0, {"role": "system", "content": record["system"]})
    return turns


def _sharegpt(record: dict[str, Any], where: str) -> list[Any]:
    """ShareGPT from/value turns as role/content turns."""
    turns = []
    for number, turn in enumerate(_as_list(record["conversations"], where)):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES:
            raise DataError(
                f"{where}, turn {number}: unknown speaker {speaker!r}; ShareGPT speakers are "
                f"{', '.join(SHAREGPT_ROLES)}."
            )
        turns.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
    return turns


def to_messages(record: dict[str, Any], where: str = "record") -> list[Message]:
    """Any supported record format as a validated messages list."""
    if not isinstance(record, dict):
        raise DataError(f"{where} is not an object with named fields; {FORMATS_HELP}.")
    if "messages" in record:
        turns = _as_list(record["messages"], where)
    elif "instruction" in record or "output" in record:
        turns = _alpaca(record, where)
    elif "conversations" in record:
        turns = _sharegpt(record, where)
    elif "prompt" in record:
        if _missing(record.get("response")):
            raise DataError(f"{where}: the 'response' (the answer) is missing or empty.")
        turns = [
            {"role": "user", "content": _text(record["prompt"])},
            {"role": "assistant", "content": _text(record["response"])},
        ]
    else:
        raise DataError(f"{where} has fields {sorted(record)}; {FORMATS_HELP}.")
    return validate_messages(turns, where)


def load_conversations(path: str | Path) -> list[list[Message]]:
    """Every conversation in a JSON, JSONL, CSV or Parquet file, validated."""
    from peftkit.data.files import read_rows

    return [to_messages(row, f"{path} row {index}") for index, row in enumerate(read_rows(path))]


# --- rendering and masking --------------------------------------------------------------------


def chat_template(tokenizer: Any) -> str:
    """The tokenizer's own chat template, or FALLBACK_CHAT_TEMPLATE when it has none."""
    return getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE


def render_chat(
    messages: list[Message], tokenizer: Any, add_generation_prompt: bool = False
) -> str:
    """The conversation as text, through the chat template."""
    return tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template(tokenizer),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


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


# --- the bundled dialogue set -----------------------------------------------------------------


def chatterbot_folder() -> Path:
    """The YAML data folder of chatterbot-corpus, found without importing the package."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "The bundled instruction set needs the package 'chatterbot-corpus': "
            "pip install chatterbot-corpus==1.3.3"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _turns(conversation: Any) -> list[str] | None:
    """A dialogue's turns as text, or None when it is not a list of at least two text turns."""
    if not isinstance(conversation, list):
        return None
    turns = []
    for turn in conversation:
        if isinstance(turn, bool) or not isinstance(turn, (str, int, float)):
            return None  # YAML read 'yes' as a boolean or nested a list: the text is lost
        turns.append(str(turn).strip())
    turns = turns[: len(turns) // 2 * 2]  # a last question without an answer teaches nothing
    return turns if turns and all(turns) else None


def chatterbot_conversations(
    language: str = "english", folder: str | Path | None = None
) -> list[dict[str, Any]]:
    """Every dialogue of one language as {"topic", "messages"}, turns alternating user/assistant."""
    import yaml

    source = Path(folder) if folder is not None else chatterbot_folder()
    files = sorted((source / language).glob("*.yml"))
    if not files:
        raise DataError(f"No YAML dialogue files under {source / language}.")
    records = []
    for file in files:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        topic = str((data.get("categories") or [file.stem])[0])
        for conversation in data.get("conversations") or []:
            turns = _turns(conversation)
            if turns is None:
                continue
            messages = [
                {"role": ROLES[1 + number % 2], "content": turn}
                for number, turn in enumerate(turns)
            ]
            records.append({"topic": topic, "messages": messages})
    return records


def _question_key(record: dict[str, Any]) -> str:
    """The first question, folded, so repeats of one question land in one split."""
    first = next(m["content"] for m in record["messages"] if m["role"] == "user")
    return re.sub(r"[^a-z0-9 ]", "", first.lower()).strip()


def split_conversations(
    records: list[dict[str, Any]], heldout_fraction: float = 0.1, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Seeded train/held-out split by first question: no held-out question is seen in training."""
    if not 0 < heldout_fraction < 1:
        raise DataError(f"heldout_fraction must lie between 0 and 1, not {heldout_fraction}.")
    keys = sorted({_question_key(record) for record in records})
    random.Random(seed).shuffle(keys)
    heldout_keys = set(keys[: max(1, round(len(keys) * heldout_fraction))])
    train = [r for r in records if _question_key(r) not in heldout_keys]
    heldout = [r for r in records if _question_key(r) in heldout_keys]
    return train, heldout


def bundled_instructions(
    heldout_fraction: float = 0.1, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The bundled English dialogue set (chatterbot-corpus), split into train and held-out."""
    return split_conversations(chatterbot_conversations(), heldout_fraction, seed)
