"""Instruction data: record formats, chat-template masking with EOS, bundled dialogues."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peftkit.apps import instructions as ins
from peftkit.errors import DataError
from peftkit.models import load_model, smollm2_folder, tiny_tokenizer
from peftkit.tasks import chat, conversations

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye é"},
    {"role": "assistant", "content": "Ciao ✓"},
]


def _labelled_segments(feature: dict, tokenizer) -> list[str]:
    """Decoded runs of consecutive labelled tokens."""
    runs, current = [], []
    for token, label in zip(feature["input_ids"], feature["labels"], strict=True):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_record_formats_become_messages() -> None:
    alpaca = {"instruction": "Add", "input": "2 and 3", "output": "5"}
    assert conversations.to_messages(alpaca) == [
        {"role": "user", "content": "Add\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    no_input = {"instruction": "Say hi", "input": float("nan"), "output": "hi", "system": "Kind."}
    assert [m["role"] for m in conversations.to_messages(no_input)] == [
        "system",
        "user",
        "assistant",
    ]
    assert conversations.to_messages(no_input)[1]["content"] == "Say hi"
    sharegpt = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    assert conversations.to_messages(sharegpt) == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]
    assert conversations.to_messages({"prompt": "q", "response": "r"})[1]["content"] == "r"
    as_json_text = {"messages": json.dumps(CHAT)}  # how a CSV cell holds a conversation
    assert conversations.to_messages(as_json_text) == CHAT


BAD_RECORDS = [
    ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no final assistant answer"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
     "no final assistant answer"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     "content must be text"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "assistant", "content": "c"}]}, "system turn only comes first"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "'assistant' belongs"),
    ({"messages": [{"text": "a"}]}, "needs 'role' and 'content'"),
    ({"messages": "[not json"}, "not valid JSON"),
    ({"messages": []}, "non-empty list"),
    ({"instruction": "Add 2 and 3", "input": ""}, "'output'"),
    ({"instruction": "Add 2 and 3", "output": ""}, "'output'"),
    ({"instruction": "", "output": "5"}, "'instruction' is empty"),
    ({"prompt": "q", "response": None}, "'response'"),
    ({"conversations": [{"from": "robot", "value": "a"}]}, "unknown speaker 'robot'"),
    ({"question": "q", "answer": "a"}, "has fields"),
]  # fmt: skip


@pytest.mark.parametrize(("record", "message"), BAD_RECORDS)
def test_bad_records_are_clear_errors(record: dict, message: str) -> None:
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        conversations.to_messages(record, "row 7")


def test_fallback_template_masks_everything_but_assistant_output() -> None:
    tokenizer = tiny_tokenizer()
    assert tokenizer.chat_template is None  # so the fallback template is in use
    feature = chat.chat_feature(CHAT, tokenizer)
    # Reference: the byte tokenizer maps each piece independently, so tokenising the pieces one
    # by one (prompt pieces unlabelled, answer pieces labelled) gives the expected features.
    pieces = [
        ("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n", False),
        ("Hello!</s>", True),
        ("\n<|user|>\nBye é\n<|assistant|>\n", False),
        ("Ciao ✓</s>", True),
        ("\n", False),
    ]
    expected_ids, expected_labels = [], []
    for text, learnt in pieces:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected_ids += ids
        expected_labels += ids if learnt else [-100] * len(ids)
    assert feature["input_ids"] == expected_ids
    assert feature["labels"] == expected_labels
    assert feature["attention_mask"] == [1] * len(expected_ids)
    assert _labelled_segments(feature, tokenizer) == ["Hello!</s>", "Ciao ✓</s>"]
    assert chat.end_of_turn_token_id(tokenizer) == tokenizer.eos_token_id


def test_loss_counts_only_assistant_tokens() -> None:
    model, tokenizer = load_model("tiny-llama", "causal-lm")
    feature = chat.chat_feature(CHAT, tokenizer)
    ids = torch.tensor([feature["input_ids"]])
    labels = torch.tensor([feature["labels"]])
    with torch.no_grad():
        output = model(input_ids=ids, labels=labels)
    # Reference: next-token cross-entropy by hand over the labelled positions only.
    logits, targets = output.logits[0, :-1], labels[0, 1:]
    keep = targets != -100
    manual = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert keep.sum() == len(b"Hello!") + len("Ciao ✓".encode()) + 2
    torch.testing.assert_close(output.loss, manual)


def test_tuned_model_answers_and_stops() -> None:
    # EOS in the labels is what makes generation stop: overfit one conversation, then generate.
    model, tokenizer = load_model("tiny-llama", "causal-lm")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    feature = chat.chat_feature(messages, tokenizer)
    ids, labels = torch.tensor([feature["input_ids"]]), torch.tensor([feature["labels"]])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only adds contention
    try:
        for _ in range(150):
            loss = model(input_ids=ids, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    prompt, answer = chat.prompt_and_answer(messages, tokenizer)
    assert prompt.endswith("<|assistant|>\n") and answer == "Yo"
    encoded = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(
        **encoded, max_new_tokens=20, do_sample=False,
        eos_token_id=chat.end_of_turn_token_id(tokenizer), pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    new = out[0, encoded["input_ids"].shape[1] :].tolist()
    assert tokenizer.decode(new) == "Yo</s>"  # answered, then stopped at once


def test_truncation_drops_conversations_with_nothing_to_learn() -> None:
    tokenizer = tiny_tokenizer()
    short = chat.chat_feature(CHAT, tokenizer, max_length=10)
    assert short is None
    cut = chat.chat_feature(CHAT, tokenizer, max_length=50)
    assert cut is not None and len(cut["input_ids"]) == 50
    with pytest.warns(UserWarning, match="1 of 2"):
        kept = chat.chat_features([CHAT, CHAT[1:3]], tokenizer, max_length=40)
    assert len(kept) == 1
    with pytest.raises(DataError, match="max_length"):
        chat.chat_features([CHAT], tokenizer, max_length=10)


def test_template_without_end_of_turn_is_refused() -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(DataError, match="not learn to stop"):
        chat.chat_feature(CHAT, tokenizer)


def test_template_that_rewrites_history_is_refused() -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = (
        "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}"
        "{% endfor %}"
    )
    with pytest.raises(DataError, match="prefix by prefix"):
        chat.chat_feature(CHAT, tokenizer)


def test_bad_turn_order_is_refused_before_rendering() -> None:
    with pytest.raises(DataError, match="unknown role"):
        chat.chat_feature([{"role": "tool", "content": "x"}], tiny_tokenizer())


def test_files_in_every_format(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"instruction": "Greet", "input": "", "output": "Hello"},
    ]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps([{"messages": CHAT}]))
    (tmp_path / "a.csv").write_text("instruction,input,output\nAdd,2 and 3,5\nGreet,,Hello\n")
    from_jsonl = conversations.load_conversations(tmp_path / "a.jsonl")
    assert conversations.load_conversations(tmp_path / "a.csv") == from_jsonl
    assert from_jsonl[1] == [
        {"role": "user", "content": "Greet"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert conversations.load_conversations(tmp_path / "a.json") == [CHAT]
    (tmp_path / "numbers.csv").write_text("prompt,response\n2+3,5\n4+4,8\n")
    assert conversations.load_conversations(tmp_path / "numbers.csv")[0][1]["content"] == "5"
    (tmp_path / "bad.csv").write_text("instruction,input,output\nAdd,2 and 3,\n")
    with pytest.raises(DataError, match="bad.csv row 0.*'output'"):
        conversations.load_conversations(tmp_path / "bad.csv")


def test_parquet_conversations(tmp_path: Path) -> None:
    import pandas as pd

    pd.DataFrame({"messages": [CHAT, CHAT[1:3]]}).to_parquet(tmp_path / "a.parquet")
    assert conversations.load_conversations(tmp_path / "a.parquet") == [CHAT, CHAT[1:3]]


CORPUS_YAML = """categories:
- greetings
conversations:
- - Hello
  - Hi there
- - How are you?
  - Fine.
  - Good to hear.
- - Are you there?
  - yes
- - hello!
  - Hello again
- - What is 2 + 2?
  - 4
"""


def test_chatterbot_yaml_parsing(tmp_path: Path) -> None:
    (tmp_path / "english").mkdir()
    (tmp_path / "english" / "greetings.yml").write_text(CORPUS_YAML)
    records = ins.chatterbot_conversations(folder=tmp_path)
    assert [r["messages"] for r in records] == [
        [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}],
        # The third turn has no answer after it, so it is dropped.
        [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine."}],
        # "yes" is a YAML boolean: its text is lost, so that dialogue is skipped.
        [{"role": "user", "content": "hello!"}, {"role": "assistant", "content": "Hello again"}],
        [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}],
    ]
    assert {r["topic"] for r in records} == {"greetings"}
    train, heldout = ins.split_conversations(records, heldout_fraction=0.5, seed=0)
    # "Hello" and "hello!" are one question: they never straddle the split.
    hello = [r for r in records if r["messages"][0]["content"].lower().startswith("hello")]
    assert all(r in train for r in hello) or all(r in heldout for r in hello)
    assert len(train) + len(heldout) == len(records) and heldout
    with pytest.raises(DataError, match="No YAML"):
        ins.chatterbot_conversations(language="klingon", folder=tmp_path)
    with pytest.raises(DataError, match="between 0 and 1"):
        ins.split_conversations(records, heldout_fraction=1.5)


def test_bundled_dialogues() -> None:
    train, heldout = ins.bundled_instructions(heldout_fraction=0.1, seed=0)
    records = train + heldout
    assert len({r["topic"] for r in records}) == 21
    assert 2000 <= len(records) <= 2100  # the corpus holds about 2,026 dialogues
    assert 0.05 <= len(heldout) / len(records) <= 0.25
    seen = {ins._question_key(r) for r in train}
    assert not any(ins._question_key(r) in seen for r in heldout)
    assert ins.bundled_instructions(heldout_fraction=0.1, seed=0) == (train, heldout)
    assert all(conversations.validate_messages(r["messages"]) for r in records)


def test_smollm2_chat_template() -> None:
    from transformers import AutoTokenizer

    # Converted once into the cache (`make test` does it first); a missing bundle fails here.
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder())
    assert tokenizer.chat_template
    feature = chat.chat_feature(CHAT, tokenizer)
    end = tokenizer.convert_ids_to_tokens(chat.end_of_turn_token_id(tokenizer))
    assert end == "<|im_end|>"
    assert _labelled_segments(feature, tokenizer) == ["Hello!<|im_end|>", "Ciao ✓<|im_end|>"]
    pairs = zip(feature["input_ids"], feature["labels"], strict=True)
    unlabelled = [token for token, label in pairs if label == -100]
    assert "Be brief." in tokenizer.decode(unlabelled)


def test_records_round_trip_through_jsonl(tmp_path: Path) -> None:
    from peftkit.apps import write_jsonl

    records = [{"topic": "t", "messages": CHAT}, {"topic": "t", "messages": CHAT[1:3]}]
    path = write_jsonl(records, tmp_path / "out" / "chat.jsonl")
    assert conversations.load_conversations(path) == [CHAT, CHAT[1:3]]
    assert [p.name for p in path.parent.iterdir()] == ["chat.jsonl"]  # no staging file left
