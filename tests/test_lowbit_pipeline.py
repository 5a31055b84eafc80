"""Low-bit bases through the whole pipeline: a recipe's `base` section and
`training.gradient_checkpointing` reach the run, the adapter folder records the base it was
trained on, `peftkit merge` folds a QLoRA adapter into dequant(W) and writes a plain model,
`peftkit estimate --recipe` reads them; and every bad input gets a clear error that touches
nothing already saved."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import peftkit
from contract import batch_for, logits, tiny
from peftkit.cli import main
from peftkit.errors import ConfigError, TargetError
from peftkit.models import load_model, quantize
from peftkit.models.precision import stored_bytes
from peftkit.recipe import recipe_from_dict

GOOD = {"model": "tiny-llama", "task": {"type": "causal-lm", "dataset": "x"}, "method": "lora"}


def write_recipe(folder: Path, base: str, training: str = "", method: str = "lora") -> Path:
    rows = [{"prompt": f"say {w}", "response": f"{w} {w}"} for w in "abcdefgh" * 4]
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        f"model: tiny-llama\nbase: {base}\n"
        f"task: {{type: causal-lm, train_file: {data}, max_length: 24}}\n"
        f"method: {method}\n"
        f"training: {{max_steps: 4, batch_size: 4, learning_rate: 0.01, logging_steps: 2"
        f"{training}}}\n"
        f"output_dir: {folder / 'run'}\n"
    )
    return recipe


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_qlora_run_with_checkpointing_then_merge(tmp_path):
    recipe = write_recipe(tmp_path, "{dtype: fp32, quantize: nf4}",
                          ", gradient_checkpointing: true")  # fmt: skip
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["quantize"] == "nf4" and summary["gradient_checkpointing"] is True
    # Counted at the allocator over the first two steps, it holds at least what AdamW keeps for
    # each trained (float32) weight after a step: its gradient and two moments, 12 bytes.
    assert summary["training_memory_measure"].startswith("peak of live tensor bytes")
    floor = 12 * summary["trainable_parameters"] / 2**20
    assert floor <= summary["training_memory_mib"] < summary["peak_memory_mib"]
    # The stored weights: the NF4 base's own bytes plus the float32 LoRA weights (4 each).
    nf4_base, _ = load_model("tiny-llama", quantize="nf4")
    expected = stored_bytes(nf4_base) + 4 * summary["trainable_parameters"]
    assert summary["weight_memory_mib"] == pytest.approx(expected / 2**20, rel=1e-9)
    info = json.loads((run / "adapter" / "peftkit.json").read_text())
    assert info["quantize"] == "nf4" and info["base_dtype"] == "fp32"

    assert main(["merge", str(run), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers
    assert not any("4bit" in type(m).__name__ for m in merged.modules())
    base, tokenizer = tiny("llama", quantize="nf4")
    unmerged = peftkit.load(base, run / "adapter")
    batch = batch_for("llama", tokenizer)
    torch.testing.assert_close(logits(merged, batch), logits(unmerged, batch), atol=1e-5,
                               rtol=1e-5)  # fmt: skip

    out = tmp_path / "estimate.json"
    assert main(["estimate", "--recipe", str(recipe), "--output", str(out)]) == 0
    estimate = json.loads(out.read_text())
    assert estimate["quantization"] == "nf4" and estimate["gradient_checkpointing"] is True


def test_a_bf16_base_run_records_its_weights(tmp_path):
    recipe = write_recipe(tmp_path, "{dtype: bf16}")
    assert main(["train", str(recipe)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # The frozen base in bf16 (as load_model stores it: 2 bytes a weight, its buffers as they
    # are) plus the LoRA weights in float32, 4 bytes each.
    bf16_base, _ = load_model("tiny-llama", dtype="bf16")
    expected = stored_bytes(bf16_base) + 4 * summary["trainable_parameters"]
    assert summary["weight_memory_mib"] == pytest.approx(expected / 2**20, rel=1e-9)
    fp32_base, _ = load_model("tiny-llama")
    assert summary["weight_memory_mib"] < 0.6 * stored_bytes(fp32_base) / 2**20
    assert summary["base_dtype"] == "bf16"


# --- bad inputs --------------------------------------------------------------------------------
RECIPES = [
    ({"base": {"dtype": "bf17"}}, "base.dtype 'bf17' is not known. Did you mean 'bf16'"),
    ({"base": {"quantize": "nf3"}}, "base.quantize 'nf3' is not known. Did you mean 'nf4'"),
    ({"base": {"quantise": "nf4"}}, "Unknown key 'quantise' in base. Did you mean 'quantize'"),
    ({"training": {"gradient_checkpointing": "sometimes"}}, "must be true or false"),
]


@pytest.mark.parametrize(("change", "message"), RECIPES)
def test_bad_recipe_values(change, message):
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict({**GOOD, **change})


def test_full_fine_tuning_on_a_4bit_base_is_refused_before_anything_moves(tmp_path):
    recipe = write_recipe(tmp_path, "{quantize: nf4}")
    assert main(["train", str(recipe)]) == 0
    before = digest(tmp_path / "run" / "adapter")
    refused = write_recipe(tmp_path, "{quantize: nf4}", method="full")
    with pytest.raises(ConfigError, match="Method 'full' cannot train on a base stored in nf4"):
        from peftkit.plan import resolve
        from peftkit.recipe import load_recipe
        from peftkit.training.run import run

        run(resolve(load_recipe(refused)), overwrite=True)
    assert digest(tmp_path / "run" / "adapter") == before
    assert not (tmp_path / "run.previous").exists()


def test_merge_a_method_that_cannot_merge_on_a_quantized_base(tmp_path, capsys):
    model, _ = tiny("llama", quantize="nf4")
    tuned = peftkit.apply(model, peftkit.PromptTuningConfig(num_virtual_tokens=4))
    info = {"base_model": "tiny-llama", "task": "causal-lm", "quantize": "nf4"}
    peftkit.save(tuned, tmp_path / "adapter", info=info)
    before = digest(tmp_path / "adapter")
    assert main(["merge", str(tmp_path / "adapter"), "--output", str(tmp_path / "out")]) == 2
    assert "cannot be merged" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and digest(tmp_path / "adapter") == before


def test_bitsandbytes_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    monkeypatch.setattr(quantize, "_RUNS", {})
    with pytest.raises(ConfigError, match=r"pip install bitsandbytes==0\.50\.2"):
        load_model("tiny-llama", quantize="nf4")


def test_bitsandbytes_unable_to_run_here_is_refused(monkeypatch):
    def broken(layer, weight, device):  # noqa: ANN001, ANN202
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(quantize, "_fill", broken)
    monkeypatch.setattr(quantize, "_RUNS", {})
    with pytest.raises(ConfigError, match="cannot run a nf4 layer on cpu.*no kernel"):
        load_model("tiny-llama", quantize="nf4")


def test_a_model_without_linear_layers_has_nothing_to_quantize():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4))
    with pytest.raises(TargetError, match="nothing to quantise"):
        quantize.quantize_layers(model, "nf4", torch.float32)


def test_the_estimator_refuses_full_fine_tuning_on_a_quantized_base():
    from peftkit.memory.estimate import estimate

    with pytest.raises(ConfigError, match="cannot train on a base stored in nf4"):
        estimate("tiny-llama", "full", quantization="nf4")
