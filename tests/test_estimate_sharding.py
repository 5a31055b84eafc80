"""The estimator's per-process memory with several processes: FSDP divides weights, gradients and
optimizer state by the process count and adds the blocks it gathers whole; DDP (sharding none)
leaves every part as one process's. Checked against counts of the real tiny model."""

import json
import math

import pytest
import torch

import peftkit
from peftkit.cli import main
from peftkit.errors import ConfigError
from peftkit.memory.estimate import estimate
from peftkit.models import load_model

SHAPE = {"batch_size": 2, "seq_len": 16}


def real_lora() -> tuple[int, int, int, list[torch.nn.Module]]:
    """tiny-llama with LoRA applied for real: (parameters, trainable, root's own parameters,
    the decoder layers)."""
    model, _ = load_model("tiny-llama", "causal-lm")
    tuned = peftkit.apply(model, "lora")
    parameters = list(tuned.parameters())
    layers = list(tuned.base_model.model.model.layers)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = sum(p.numel() for p in parameters if id(p) not in in_layers)
    total = sum(p.numel() for p in parameters)
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    return total, trainable, root, layers


@pytest.mark.parametrize("gpus", [2, 4])
def test_fsdp_divides_model_states_and_adds_the_gathered_blocks(gpus: int) -> None:
    total, trainable, root, layers = real_lora()
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    # several processes keep the plain loss (the trainer's chunked one runs in one process only)
    one = estimate("tiny-llama", "lora", dtype="fp32", chunked_loss=False, **SHAPE)
    sharded = estimate("tiny-llama", "lora", dtype="fp32", gpus=gpus, sharding="fsdp", **SHAPE)
    # fp32: 4 bytes a weight, 4 a gradient, 8 of AdamW state (LoRA adds no buffers)
    assert one.weights == 4 * total
    assert sharded.weights == pytest.approx(4 * total / gpus)
    assert sharded.gradients == pytest.approx(4 * trainable / gpus)
    assert sharded.optimizer == pytest.approx(8 * trainable / gpus)
    # the per-process batch is the same, so are the activations
    assert sharded.activations == one.activations
    assert sharded.loss_workspace == one.loss_workspace
    # FSDP2 keeps the root's parameters gathered through the step, one layer's at a time
    assert sharded.gathered == 4 * (root + largest)
    assert one.gathered == 0
    start = sharded.activations + sharded.loss_workspace + sharded.gathered
    end = sharded.gradients + sharded.gathered
    assert sharded.total == pytest.approx(sharded.weights + sharded.optimizer + max(start, end))
    assert one.total - sharded.total == pytest.approx(
        (1 - 1 / gpus) * (one.weights + one.optimizer) - sharded.gathered
    )


def test_ddp_processes_each_hold_the_whole_model() -> None:
    one = estimate("tiny-llama", "full", dtype="fp32", chunked_loss=False, **SHAPE)
    two = estimate("tiny-llama", "full", dtype="fp32", gpus=2, sharding="none", **SHAPE)
    assert two.as_dict()["bytes"] == one.as_dict()["bytes"]
    assert two.gpus == 2 and two.sharding == "none"


def test_a_quantised_base_shards_its_codes_but_not_its_block_constants() -> None:
    """NF4 weights stored in a float dtype (bitsandbytes' quant_storage) are sharded; their
    block constants (an 8-bit scale per 64 weights, an fp32 one per 256 blocks, the code
    tables) stay whole on every process."""
    _, _, _, layers = real_lora()
    linear = [
        m
        for layer in layers
        for name, m in layer.named_modules()
        if type(m) is torch.nn.Linear and "lora_" not in name
    ]
    weights = [m.weight.numel() for m in linear]
    constants = sum(
        math.ceil(n / 64) + 4 * math.ceil(math.ceil(n / 64) / 256) + 4 * 273 for n in weights
    )
    options = {"quantization": "nf4", "base_dtype": "bf16", **SHAPE}
    one = estimate("tiny-llama", "lora", **options)
    two = estimate("tiny-llama", "lora", gpus=2, sharding="fsdp", **options)
    assert len(linear) == 7 * len(layers)  # q, k, v, o, gate, up, down
    assert two.weights == pytest.approx((one.weights - constants) / 2 + constants)
    # gathered: the largest layer's codes at half a byte a weight, its other parameters in bf16
    assert two.gathered > 0 and two.optimizer == pytest.approx(one.optimizer / 2)


def test_methods_that_cannot_be_sharded_are_refused_with_their_reason() -> None:
    with pytest.raises(ConfigError, match=r"'adalora' cannot train sharded.*rank allocation"):
        estimate("tiny-llama", "adalora", gpus=2, sharding="fsdp")
    with pytest.raises(ConfigError, match="'child_tuning' cannot train sharded"):
        estimate("tiny-llama", "child_tuning", gpus=2, sharding="fsdp")
    estimate("tiny-llama", "adalora", gpus=2, sharding="none")  # DDP trains it
    with pytest.raises(ConfigError, match="gpus must be"):
        estimate("tiny-llama", "lora", gpus=0, sharding="fsdp")
    with pytest.raises(ConfigError, match="sharding must be one of none, fsdp"):
        estimate("tiny-llama", "lora", gpus=2, sharding="zero3")


def test_estimate_and_recommend_take_gpus_and_sharding(tmp_path, capsys) -> None:
    shape = ["--model", "tiny-llama", "--dtype", "fp32", "--batch-size", "2", "--seq-len", "16"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main(["estimate", *shape, "--method", "lora", "--output", str(one)]) == 0
    assert main(["estimate", *shape, "--method", "lora", "--gpus", "2", "--sharding", "fsdp",
                 "--output", str(two)]) == 0  # fmt: skip
    single, sharded = json.loads(one.read_text()), json.loads(two.read_text())
    assert (sharded["gpus"], sharded["sharding"]) == (2, "fsdp")
    assert sharded["bytes"]["weights"] * 2 == pytest.approx(single["bytes"]["weights"], abs=1)
    assert "gathered by FSDP" in capsys.readouterr().out
    out = tmp_path / "rec.json"
    code = main(["recommend", "--memory", "1GiB", *shape, "--gpus", "2", "--sharding", "fsdp",
                 "--methods", "lora", "adalora", "--output", str(out)])  # fmt: skip
    assert code == 0
    records = {r["method"]: r for r in json.loads(out.read_text())["records"]}
    assert records["lora"]["fits"] and not records["adalora"]["serves"]
    assert "cannot train sharded" in records["adalora"]["why"]
