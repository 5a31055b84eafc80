"""BitFit (its contract rows are in test_contract.py): bias groups against the reference code's
names, no-bias architectures, saving only biases, and bad input."""

import pytest
import torch

import peftkit
from contract import batch_for, logits, tiny
from peftkit.errors import ConfigError, TargetError
from peftkit.io import read_tensors
from peftkit.methods.bitfit import BitFitConfig

# The reference code (github.com/benzakenelad/BitFit) unfreezes BERT biases by these substrings.
REFERENCE_BERT_TERMS = {
    "query_key_value": ["attention.self.query.bias", "attention.self.key.bias",
                        "attention.self.value.bias"],
    "attention_output": ["attention.output.dense.bias"],
    "feed_forward": ["intermediate.dense.bias", "output.dense.bias"],
    "layer_norm": ["LayerNorm.bias"],
}  # fmt: skip


def trainable_names(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("group", list(REFERENCE_BERT_TERMS))
def test_bert_groups_match_reference_names(group):
    model, _ = tiny("bert")
    expected = [
        n
        for n, _ in model.named_parameters()
        if any(term in n for term in REFERENCE_BERT_TERMS[group])
        and ".layer." in n  # the layer stack
        and not (group == "feed_forward" and "attention" in n)
    ]
    if group == "layer_norm":  # embeddings' LayerNorm is a layer norm too
        expected = [n for n, _ in model.named_parameters() if n.endswith("LayerNorm.bias")]
    expected += ["classifier.bias", "classifier.weight"]
    model = peftkit.apply(model, BitFitConfig(bias_groups=[group]))
    assert trainable_names(model) == sorted(expected)


def test_all_trains_every_bias_and_the_head():
    model, _ = tiny("bert")
    expected = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    model = peftkit.apply(model, BitFitConfig())
    assert trainable_names(model) == sorted(expected + ["classifier.weight"])
    assert peftkit.summary(model).trainable == sum(
        p.numel() for n, p in model.named_parameters() if n in expected or n.startswith("classif")
    )


def test_head_can_stay_frozen():
    model, _ = tiny("bert")
    model = peftkit.apply(model, BitFitConfig(train_head=False))
    assert not any(n.startswith("classifier") for n in trainable_names(model))


def test_llama_without_biases_says_so():
    model, _ = tiny("llama")
    with pytest.raises(TargetError, match="missing_biases='add'"):
        peftkit.apply(model, BitFitConfig())


def test_llama_skip_selects_nothing_is_an_error():
    model, _ = tiny("llama")
    with pytest.raises(TargetError, match="selects no parameter"):
        peftkit.apply(model, BitFitConfig(missing_biases="skip"))


def test_qwen2_skip_trains_existing_biases_and_says_how_many():
    model, _ = tiny("qwen2")
    with pytest.warns(UserWarning, match="6 existing bias tensors"):
        model = peftkit.apply(model, BitFitConfig(missing_biases="skip"))
    names = trainable_names(model)
    assert len(names) == 6  # q, k, v biases in each of 2 layers: what Qwen2 has
    assert all(n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for n in names)


def test_add_gives_zero_biases_to_selected_projections_only():
    model, tokenizer = tiny("llama")
    batch = batch_for("llama", tokenizer)
    reference = logits(model, batch)
    model = peftkit.apply(
        model, BitFitConfig(bias_groups=["query_key_value"], missing_biases="add")
    )
    names = trainable_names(model)
    assert len(names) == 6 and all(
        n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for n in names
    )
    assert all(float(p.abs().sum()) == 0 for n, p in model.named_parameters() if n in names)
    torch.testing.assert_close(logits(model, batch), reference, atol=0, rtol=0)


def test_save_writes_only_biases_and_head(tmp_path):
    model, _ = tiny("bert")
    model = peftkit.apply(model, BitFitConfig())
    peftkit.save(model, tmp_path / "adapter")
    saved = read_tensors(tmp_path / "adapter")
    assert sorted(saved) == trainable_names(model)
    assert all(k.endswith(".bias") or k.startswith("classifier") for k in saved)


def test_merged_llama_with_added_biases_round_trips_through_transformers(tmp_path):
    model, tokenizer = tiny("llama")
    batch = batch_for("llama", tokenizer)
    model = peftkit.apply(model, BitFitConfig(missing_biases="add"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    tuned = logits(model, batch)
    merged = peftkit.merge(model)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = type(merged).from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(reloaded, batch), tuned, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "options",
    [{"bias_groups": ["attn"]}, {"bias_groups": []}, {"missing_biases": "ignore"}],
    ids=["unknown-group", "no-group", "unknown-missing-choice"],
)
def test_bad_config_is_refused(options):
    with pytest.raises(ConfigError):
        peftkit.config_for("bitfit", **options)


def test_methods_verbose_prints_list_defaults_as_values(capsys):
    # bias_groups' default is a default_factory: `methods -v` shows the list it makes, never
    # dataclasses' MISSING marker.
    import dataclasses

    from peftkit.cli import main
    from peftkit.registry import METHODS

    assert main(["methods", "-v"]) == 0
    out = capsys.readouterr().out
    assert "MISSING" not in out
    assert "    bias_groups = ['all']  which biases train" in out
    for method in METHODS:  # every option of every method, with its real default
        config = method.config_cls()
        for f in dataclasses.fields(config):
            assert f"    {f.name} = {getattr(config, f.name)!r}  " in out, (method.name, f.name)
