"""Mean pooling for checkpoints that declare it (1_Pooling/config.json): the pooled vector is the
masked mean of the encoder's states, padding changes nothing, virtual-token methods keep it right,
and a merged model keeps the pooling when peftkit loads it again."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import peftkit
from peftkit.cli import main
from peftkit.models import load_model
from peftkit.models.pooling import MeanPooler, uses_mean_pooling, write_pooling_config


@pytest.fixture(scope="module")
def mean_pooled_folder(tmp_path_factory):
    """tiny-bert saved as a folder whose 1_Pooling/config.json asks for mean pooling."""
    folder = tmp_path_factory.mktemp("tiny-bert-mean")
    model, tokenizer = load_model("tiny-bert", "classification", num_labels=2)
    for module in model.modules():  # padded and unpadded runs must agree exactly
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_pooling_config(folder, model.config.hidden_size)
    return folder


def logits_alone_and_padded(model, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a short text on its own, and as the padded row of a batch with a long one."""
    short, long = "a dog", "the cat sat on the mat by the door"
    model.eval()
    with torch.no_grad():
        alone = model(**tokenizer([short], return_tensors="pt")).logits[0]
        batch = tokenizer([long, short], return_tensors="pt", padding=True)
        assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]
        padded = model(**batch).logits[1]
    return alone, padded


def test_declared_mean_pooling_is_the_masked_mean_of_the_states(mean_pooled_folder):
    model, tokenizer = load_model(str(mean_pooled_folder), "classification", num_labels=2)
    assert isinstance(model.bert.pooler, MeanPooler) and uses_mean_pooling(model)
    batch = tokenizer(["the cat sat on the mat", "a dog"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        states = model.bert(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = model.classifier((states * mask).sum(1) / mask.sum(1))
        torch.testing.assert_close(model(**batch).logits, expected)


def test_first_token_pooling_stays_without_a_pooling_config():
    model, _ = load_model("tiny-bert", "classification", num_labels=2)
    assert not uses_mean_pooling(model)


@pytest.mark.parametrize(
    "method",
    [None, {"name": "prompt_tuning", "num_virtual_tokens": 4},
     {"name": "prefix_tuning", "num_virtual_tokens": 4}, {"name": "lora", "rank": 4}],
)  # fmt: skip
def test_padding_does_not_change_mean_pooled_logits(method, mean_pooled_folder):
    """The mask reaches the pooler through every method: a padded row pools only its tokens."""
    model, tokenizer = load_model(str(mean_pooled_folder), "classification", num_labels=2)
    if method is not None:
        options = dict(method)
        model = peftkit.apply(model, options.pop("name"), **options)
        for parameter in model.parameters():  # move the adapter away from its neutral start
            if parameter.requires_grad:
                parameter.data.add_(0.3 * torch.randn_like(parameter))
    alone, padded = logits_alone_and_padded(model, tokenizer)
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_merged_model_keeps_mean_pooling(mean_pooled_folder, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    train = tmp_path / "t.jsonl"
    rows = [{"text": t, "label": lab} for t, lab in [("good", "pos"), ("bad", "neg")] * 8]
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe.write_text(
        f"model: {mean_pooled_folder}\n"
        f"task: {{type: classification, train_file: {train}, eval_file: {train}}}\n"
        "method: {name: lora, rank: 4, target_modules: all-linear}\n"
        f"training: {{max_steps: 3, batch_size: 8, threads: 1}}\noutput_dir: {tmp_path / 'run'}\n"
    )
    assert main(["train", str(recipe)]) == 0
    assert main(["merge", str(tmp_path / "run"), "--output", str(tmp_path / "merged")]) == 0
    assert "mean of its token states" in capsys.readouterr().out
    tuned = peftkit.load(
        load_model(str(mean_pooled_folder), "classification", num_labels=2)[0],
        tmp_path / "run" / "adapter",
    )
    merged, tokenizer = load_model(str(tmp_path / "merged"), "classification", num_labels=2)
    assert uses_mean_pooling(merged)
    batch = tokenizer(["good", "bad things"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(
            merged.eval()(**batch).logits, tuned.eval()(**batch).logits, atol=1e-5, rtol=1e-5
        )


def test_bundled_minilm_classifies_from_the_mean_it_was_trained_on():
    """all-MiniLM-L6-v2 ships 1_Pooling/config.json with mean pooling; peftkit honours it."""
    model, _ = load_model("minilm", "classification", num_labels=2)
    assert uses_mean_pooling(model)
    assert not any("pooler" in name for name, _ in model.named_parameters())
