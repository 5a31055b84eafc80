"""`peftkit export`: the command end to end on a saved adapter, and every refusal: a method that
cannot merge (or whose merge fails), an architecture or option the file cannot carry, an existing
output file, an unknown output type or format, a tokenizer the exporter does not know."""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

import peftkit
import peftkit.api
from contract import batch_for, logits, tiny
from peftkit.cli import main
from peftkit.errors import ExportError
from peftkit.export import export_gguf
from peftkit.models import tiny_config, tiny_tokenizer

INFO = {"base_model": "tiny-llama", "task": "causal-lm"}


def saved_adapter(folder, config, family="llama"):
    """An adapter of tiny-<family> saved with its peftkit.json, its trainable values randomised
    so that it changes the outputs; returns the tuned model."""
    model, _ = tiny(family)
    tuned = peftkit.apply(model, config)
    with torch.no_grad():
        for parameter in tuned.parameters():
            if parameter.requires_grad:
                parameter.normal_(std=0.3)
    peftkit.save(tuned, folder, info={**INFO, "base_model": f"tiny-{family}"})
    return tuned


def test_cli_exports_a_run_folder_merged_on_the_fly(tmp_path, capsys):
    tuned = saved_adapter(tmp_path / "run" / "adapter", peftkit.LoraConfig(rank=4))
    _, tokenizer = tiny("llama")
    batch = batch_for("llama", tokenizer)
    batch.pop("labels")
    expected = logits(tuned, batch)
    output = tmp_path / "out" / "run.gguf"
    assert main(["export", str(tmp_path / "run"), "--outtype", "f32", "--output", str(output)]) == 0
    assert "llama" in capsys.readouterr().out
    loaded = transformers.AutoModelForCausalLM.from_pretrained(output.parent, gguf_file=output.name)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-4, rtol=1e-4)


def test_cli_refuses_an_existing_file_and_overwrites_when_asked(tmp_path, capsys):
    output = tmp_path / "model.gguf"
    output.write_bytes(b"keep me")
    arguments = ["export", "tiny-llama", "--output", str(output)]
    assert main(arguments) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert output.read_bytes() == b"keep me"
    assert main([*arguments, "--overwrite"]) == 0
    assert output.read_bytes()[:4] == b"GGUF"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--outtype", "q4_k"], r"Unknown GGUF output type 'q4_k'; choose one of f32, f16, q8_0"),
        (["--format", "onnx"], r"Unknown export format 'onnx'"),
        (["--model", "tiny-qwen2"], r"--model names the base of an adapter"),
    ],
)
def test_cli_refuses_bad_options_before_loading(arguments, message, tmp_path, capsys):
    assert main(["export", "tiny-llama", "--output", str(tmp_path / "m.gguf"), *arguments]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "m.gguf").exists()


def test_method_that_cannot_merge_is_refused(tmp_path, capsys):
    saved_adapter(tmp_path / "adapter", peftkit.config_for("bottleneck"))
    assert main(["export", str(tmp_path / "adapter"), "--output", str(tmp_path / "m.gguf")]) == 2
    error = capsys.readouterr().err
    assert "cannot become one GGUF model" in error and "cannot be folded" in error


def test_merge_that_fails_is_reported_as_an_export_error(tmp_path, monkeypatch):
    from peftkit.export.source import load_source

    saved_adapter(tmp_path / "adapter", peftkit.LoraConfig(rank=4))

    def broken_merge(model):
        raise RuntimeError("shapes do not fold")

    monkeypatch.setattr(peftkit.api, "merge", broken_merge)
    with pytest.raises(ExportError, match=r"Folding the adapter .* failed \(RuntimeError: shapes"):
        load_source(str(tmp_path / "adapter"))


def llama(**options) -> transformers.LlamaForCausalLM:
    """A tiny random Llama with config options changed."""
    config = tiny_config("llama")
    for key, value in options.items():
        setattr(config, key, value)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
            hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=4,
            vocab_size=260, word_embed_proj_dim=32)),
         r"does not support the 'opt' architecture; supported: LlamaForCausalLM \(llama\), "
         r"Qwen2ForCausalLM \(qwen2\), GPT2LMHeadModel \(gpt2\)"),
        (lambda: transformers.LlamaForSequenceClassification(tiny_config("llama")),
         r"writes causal language models \(LlamaForCausalLM\); this model is a "
         r"LlamaForSequenceClassification"),
        (lambda: llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
         r"rope scaling 'linear'"),
        (lambda: llama(attention_bias=True), r"linear-layer biases"),
        (lambda: llama(hidden_act="gelu"), r"activation 'gelu'"),
        (lambda: transformers.GPT2LMHeadModel(tiny_config("gpt2")),
         r"256 positions \(transformers reads GPT-2 back with 1024\)"),
    ],
)  # fmt: skip
def test_architecture_the_file_cannot_carry_is_refused(make, message, tmp_path):
    with pytest.raises(ExportError, match=message):
        export_gguf(make(), tiny_tokenizer(), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_tensor_outside_the_architecture_is_refused(tmp_path):
    model = llama()
    attention = model.model.layers[0].self_attn
    attention.q_proj.bias = torch.nn.Parameter(torch.zeros(32))  # config says: no biases
    with pytest.raises(ExportError, match=r"not in the architecture: model\.layers\.0\.self_attn"):
        export_gguf(model, tiny_tokenizer(), tmp_path / "m.gguf")


def test_unknown_pre_tokenizer_is_refused_unless_named(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    with pytest.raises(ExportError, match=r"does not recognise .* pass --tokenizer-pre NAME"):
        export_gguf(llama(), tokenizer, tmp_path / "m.gguf")
    report = export_gguf(llama(), tokenizer, tmp_path / "m.gguf", tokenizer_pre="gpt-2")
    assert report["tokenizer_pre"] == "gpt-2"


def test_non_byte_level_tokenizer_and_oversized_vocabulary_are_refused(tmp_path):
    word_level = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    )
    with pytest.raises(ExportError, match=r"byte-level BPE tokenizers .* this one is WordLevel"):
        export_gguf(llama(), word_level, tmp_path / "m.gguf")
    larger = tiny_tokenizer()
    larger.add_tokens(["<tool>"])
    with pytest.raises(ExportError, match=r"token ids up to 260 but the model embeds only 260"):
        export_gguf(llama(), larger, tmp_path / "m.gguf")
