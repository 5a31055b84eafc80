"""The memory estimator against exact parameter counts, the ZeRO paper's bytes per parameter, and
the measured peak of real training steps on small models (CPU, torch.profiler allocation events)."""

import json

import peft
import pytest
import torch
import transformers
from torch.profiler import ProfilerActivity, profile

from peftkit.errors import ConfigError
from peftkit.estimate import NF4_BYTES, estimate, main_table

MIB = 2**20


def small_config(family: str) -> transformers.PretrainedConfig:
    """Hidden 256, 4 layers: big enough that activations are a large share of the peak."""
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=256, n_layer=4, n_head=4, vocab_size=2000)
    return transformers.LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=2000, max_position_embeddings=512,
    )  # fmt: skip


def real_model(family: str, method: str, checkpointing: bool) -> torch.nn.Module:
    """The small model on CPU with random weights, set up to train with one method."""
    torch.manual_seed(0)
    config = small_config(family)
    config._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "lora":
        targets = ["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"]
        lora = peft.LoraConfig(r=8, target_modules=targets, lora_dropout=0.05)
        model = peft.get_peft_model(model, lora)
    elif method == "bitfit":
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.endswith("bias"))
    elif method == "prompt-tuning":
        prompt = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)
        model = peft.get_peft_model(model, prompt)
    return model.train()


def live_bytes(tensors) -> int:
    """Bytes of the distinct storages behind some tensors."""
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def measured_peak(model: torch.nn.Module, batch_size: int, seq_len: int) -> int:
    """Peak bytes of live tensors during one AdamW training step.

    CPU has no max_memory_allocated, so: run one step first (the optimizer makes its state), count
    what is live before the second step exactly (parameters and optimizer state), then add the
    peak of the running sum of the allocation and free events the profiler records in the second
    step. Allocation sizes do not depend on timing, so the number repeats run to run."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(3, 2000, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    before = live_bytes([*model.parameters(), *state])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return before + peak


@pytest.mark.parametrize(
    "family,method,checkpointing",
    [
        ("llama", "full", False),
        ("llama", "lora", False),
        ("llama", "full", True),
        ("llama", "lora", True),
        ("llama", "prompt-tuning", False),
        ("gpt2", "full", False),
        ("gpt2", "bitfit", False),
    ],
)
def test_estimate_within_15_percent_of_measured_peak(family, method, checkpointing):
    batch_size, seq_len = 4, 128
    measured = measured_peak(real_model(family, method, checkpointing), batch_size, seq_len)
    estimated = estimate(
        small_config(family), method, batch_size, seq_len, "fp32", checkpointing
    ).total
    assert abs(estimated - measured) / measured < 0.15, (estimated / MIB, measured / MIB)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_parameter_counts_match_the_real_model(family):
    model = transformers.AutoModelForCausalLM.from_config(small_config(family))
    real = sum(p.numel() for p in model.parameters())  # tied weights count once
    assert estimate(small_config(family), "full", dtype="fp32").total_parameters == real
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
    trainable, _ = lora.get_nb_trainable_parameters()
    found = estimate(small_config(family), "lora", lora_rank=4, lora_targets="all-linear")
    assert found.trainable_parameters == trainable


def test_llama_7b_parameter_count_is_the_published_one():
    assert estimate("llama-7b", "full").total_parameters == 6_738_415_616


def test_bitfit_counts_gpt2_biases_in_closed_form():
    hidden, layers = 256, 4
    # Per layer: c_attn 3h, attention c_proj h, c_fc 4h, mlp c_proj h, two layer norms h each.
    expected = layers * (3 + 1 + 4 + 1 + 2) * hidden + hidden  # plus the final layer norm
    assert estimate(small_config("gpt2"), "bitfit").trainable_parameters == expected
    assert estimate(small_config("llama"), "bitfit").trainable_parameters == 0


@pytest.mark.parametrize("dtype,per_parameter", [("bf16-mixed", 16), ("fp32", 16), ("bf16", 8)])
def test_full_fine_tuning_bytes_per_parameter_follow_the_zero_paper(dtype, per_parameter):
    found = estimate(small_config("llama"), "full", dtype=dtype)
    assert found.model_states == per_parameter * found.total_parameters


def test_lora_model_states_in_closed_form():
    found = estimate(small_config("llama"), "lora", dtype="bf16-mixed", lora_rank=8)
    layers, hidden = 4, 256
    lora = layers * 2 * 8 * (hidden + hidden)  # q and v, each r x (in + out)
    base = found.total_parameters - lora
    assert found.trainable_parameters == lora
    assert found.model_states == 2 * base + 16 * lora  # frozen bf16 + ZeRO's 16 per trainable


def test_qlora_stores_linear_weights_in_four_bits():
    config = small_config("llama")
    found = estimate(config, "qlora", dtype="bf16-mixed")
    linear = 4 * (4 * 256 * 256 + 3 * 256 * 688)  # attention q, k, v, o and the MLP, per layer
    other = found.total_parameters - found.trainable_parameters - linear
    expected = linear * NF4_BYTES + other * 2 + found.trainable_parameters * 2
    assert found.weights == pytest.approx(expected)


def test_activations_grow_linearly_with_batch_and_checkpointing_saves():
    one = estimate(small_config("llama"), "full", batch_size=1, seq_len=64, dtype="fp32")
    two = estimate(small_config("llama"), "full", batch_size=2, seq_len=64, dtype="fp32")
    # nearly: the rotary tables do not depend on the batch
    assert two.activations == pytest.approx(2 * one.activations, rel=0.01)
    saved = estimate(small_config("llama"), "full", 2, 64, "fp32", gradient_checkpointing=True)
    assert saved.activations < two.activations / 2


def test_config_sources(tmp_path):
    config = small_config("llama")
    config.save_pretrained(tmp_path)
    by_object = estimate(config, "lora").total
    assert estimate(str(tmp_path / "config.json"), "lora").total == by_object
    assert estimate(tmp_path, "lora").total == by_object
    assert estimate("tiny-gpt2", "full").total_parameters > 0


def test_report_formats():
    found = estimate(small_config("llama"), "lora", dtype="bf16-mixed")
    text = str(found)
    for row in ("weights", "gradients", "optimizer (AdamW)", "activations", "peak"):
        assert row in text
    data = json.loads(json.dumps(found.as_dict()))
    assert data["bytes"]["total"] == int(found.total)
    assert data["trainable_parameters"] == found.trainable_parameters


def test_main_table_for_llama_7b():
    table = main_table("llama-7b")
    assert "6,738,415,616" in table
    assert table.count("16.00 B") == 2  # full fine-tuning, mixed precision and fp32


@pytest.mark.parametrize(
    "options,message",
    [
        ({"config": "no-such-model"}, "Cannot find a model config"),
        ({"method": "adapters"}, "Unknown method 'adapters'"),
        ({"dtype": "int8"}, "Unknown dtype 'int8'"),
        ({"batch_size": 0}, "must be at least 1"),
    ],
)
def test_bad_input(options, message):
    arguments = {"config": small_config("llama"), **options}
    with pytest.raises(ConfigError, match=message):
        estimate(**arguments)


@pytest.mark.parametrize("family", ["bert", "t5", "gpt2", "llama", "qwen2"])
def test_every_tiny_family_estimates(family):
    found = estimate(f"tiny-{family}", "lora", batch_size=2, seq_len=64, dtype="fp32")
    assert found.activations > 0 and found.trainable_parameters > 0
    checkpointed = estimate(f"tiny-{family}", "lora", 2, 64, "fp32", gradient_checkpointing=True)
    assert checkpointed.activations < found.activations


def test_eager_attention_stores_the_probabilities():
    config = small_config("llama")
    fused = estimate(config, "full", 1, 256, "fp32", attention="fused").activations
    eager = estimate(config, "full", 1, 256, "fp32", attention="eager").activations
    # Eager keeps the softmax output (layers x heads x seq x seq), not the fused kernel's output
    # (layers x seq x hidden) and log-sum-exp (layers x heads x seq); 4 bytes each in fp32.
    layers, heads, seq, hidden = 4, 4, 256, 256
    probabilities = layers * heads * seq * seq * 4
    fused_only = layers * seq * hidden * 4 + layers * heads * seq * 4
    assert eager - fused >= probabilities - fused_only
