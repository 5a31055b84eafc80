"""The tokenizer as GGUF metadata, in llama.cpp's "gpt2" (byte-level BPE) form: every token by id,
its type, the merges, the pre-tokenizer's name, the special token ids, whether BOS/EOS are added,
and the chat template. Byte-level BPE covers SmolLM, Llama 3, Qwen2 and GPT-2; sentencepiece
vocabularies (Llama 2) are refused."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import gguf

from peftkit.errors import ExportError

_GPT2_SPLIT = {"type": "ByteLevel", "use_regex": True}  # GPT-2's own split regex, then bytes
_BYTES_ONLY = {"type": "ByteLevel", "use_regex": False}  # after a Split step of its own
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp's name for a pre-tokenizer (tokenizer.ggml.pre) -> how tokenizer.json spells it.
PRE_TOKENIZERS: dict[str, list[dict[str, Any]]] = {
    "gpt-2": [_GPT2_SPLIT],
    "smollm": [{"type": "Digits", "individual_digits": True}, _GPT2_SPLIT],
    "llama-bpe": [{"type": "Split", "regex": _LLAMA3_REGEX}, _BYTES_ONLY],
    "qwen2": [{"type": "Split", "regex": _QWEN2_REGEX}, _BYTES_ONLY],
}


@dataclass
class TokenizerMetadata:
    """What llama.cpp (and transformers' GGUF reader) need to rebuild the tokenizer."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False  # a space put before the text (ByteLevel add_prefix_space)
    chat_template: str | None = None


def _steps(pre_tokenizer: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A pre-tokenizer as a flat list of steps."""
    if pre_tokenizer is None:
        return []
    if pre_tokenizer["type"] == "Sequence":
        return [s for step in pre_tokenizer["pretokenizers"] for s in _steps(step)]
    return [pre_tokenizer]


def _matches(step: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether one pre-tokenizer step is the one wanted (regex patterns compared as text)."""
    for key, value in wanted.items():
        if key == "regex":
            if (step.get("pattern") or {}).get("Regex") != value:
                return False
        elif step.get(key, True if key == "use_regex" else None) != value:
            return False
    return True


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE, or a clear refusal."""
    steps = _steps(tokenizer_json.get("pre_tokenizer"))
    for name, wanted in PRE_TOKENIZERS.items():
        if len(steps) == len(wanted) and all(map(_matches, steps, wanted)):
            return name
    raise ExportError(
        "The tokenizer splits text in a way this exporter does not recognise "
        f"({json.dumps(tokenizer_json.get('pre_tokenizer'))[:200]}); known: "
        f"{', '.join(PRE_TOKENIZERS)}. If you know llama.cpp's name for it, pass "
        "--tokenizer-pre NAME."
    )


def _merge_text(merge: str | list[str]) -> str:
    """One merge as GGUF stores it: the two parts separated by a space."""
    if isinstance(merge, str):
        return merge
    if any(" " in part for part in merge):
        raise ExportError(f"The BPE merge {merge!r} holds a space, which GGUF merges cannot.")
    return " ".join(merge)


def _adds(tokenizer: Any, token_id: int | None, at_start: bool) -> bool:
    """Whether encoding with special tokens adds this token at the start (or end) of text."""
    if token_id is None:
        return False
    with_specials = tokenizer.encode("a", add_special_tokens=True)
    plain = tokenizer.encode("a", add_special_tokens=False)
    edge = 0 if at_start else -1
    return with_specials[edge] == token_id and plain[edge] != token_id


def tokenizer_metadata(
    tokenizer: Any, vocab_size: int, pre: str | None = None
) -> TokenizerMetadata:
    """Read a transformers (fast) tokenizer into GGUF's form for a model of vocab_size rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizers-backed) tokenizer.")
    tokenizer_json = json.loads(backend.to_str())
    model = tokenizer_json["model"]
    byte_level = any(
        step.get("type") == "ByteLevel"
        for step in [*_steps(tokenizer_json.get("pre_tokenizer")), tokenizer_json.get("decoder")]
        if step
    )
    if model["type"] != "BPE" or not byte_level:
        raise ExportError(
            f"GGUF export writes byte-level BPE tokenizers (SmolLM, Llama 3, Qwen2, GPT-2); this "
            f"one is {model['type']}{'' if byte_level else ' without byte-level encoding'}."
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(
            f"The tokenizer has token ids up to {max(vocab.values())} but the model embeds only "
            f"{vocab_size}: resize the model's embeddings to the tokenizer first."
        )
    by_id = {index: token for token, index in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:  # embedding rows no token uses (padding of the matrix)
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            # llama.cpp matches added tokens as raw text; special ones are control tokens
            tokens.append(added[index].content)
            types.append(
                gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    special_ids = {
        role: getattr(tokenizer, f"{role}_token_id")
        for role in ("bos", "eos", "unk", "pad")
        if getattr(tokenizer, f"{role}_token_id", None) is not None
    }
    space_prefix = any(
        step.get("add_prefix_space", False)
        for step in _steps(tokenizer_json.get("pre_tokenizer"))
        if step.get("type") == "ByteLevel"
    )
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return TokenizerMetadata(
        tokens=tokens,
        token_types=[int(kind) for kind in types],
        merges=[_merge_text(merge) for merge in model.get("merges", [])],
        pre=pre or pre_tokenizer_name(tokenizer_json),
        special_ids=special_ids,
        add_bos=_adds(tokenizer, special_ids.get("bos"), at_start=True),
        add_eos=_adds(tokenizer, special_ids.get("eos"), at_start=False),
        add_space_prefix=space_prefix,
        chat_template=template,
    )


def write_tokenizer(writer: gguf.GGUFWriter, meta: TokenizerMetadata) -> None:
    """Add the tokenizer keys (tokenizer.ggml.* and tokenizer.chat_template) to a GGUF file."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta.pre)
    writer.add_token_list(meta.tokens)
    writer.add_token_types(meta.token_types)
    # An empty list is still written: llama.cpp requires the key, and a byte-level vocabulary
    # with no merges (the tiny test tokenizer) is valid; the writer's helper would skip it.
    writer.add_key_value(
        gguf.Keys.Tokenizer.MERGES, meta.merges, gguf.GGUFValueType.ARRAY,
        sub_type=gguf.GGUFValueType.STRING,
    )  # fmt: skip
    setters = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for role, token_id in meta.special_ids.items():
        setters[role](token_id)
    writer.add_add_bos_token(meta.add_bos)
    writer.add_add_eos_token(meta.add_eos)
    writer.add_add_space_prefix(meta.add_space_prefix)
    if meta.chat_template:
        writer.add_chat_template(meta.chat_template)
