"""Prefix tuning (contract rows, PEFT reading our files: test_contract.py): peftkit reading PEFT's
files, a closed-form reference (a prefix that is the KV cache of real text), the MLP fold,
grouped-query layout, bad input."""

import peft
import pytest
import torch
import transformers

import peftkit
from contract import FAMILIES, batch_for, count_layer_runs, tiny
from peftkit.errors import AdapterError, ConfigError, DataError, TargetError
from peftkit.methods.virtual_tokens.prefix import PrefixTuningConfig, fold
from peftkit.models import tiny_config


def _stepped(family: str, mlp: int | None = None) -> tuple[torch.nn.Module, dict]:
    """A prefix-tuned tiny model after one optimizer step, and its batch."""
    base, tokenizer = tiny(family)
    model = peftkit.apply(base, PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=mlp))
    batch = batch_for(family, tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    return model.eval(), batch


def test_save_pretrained_writes_the_adapter_not_the_base(tmp_path):
    model, batch = _stepped("gpt2")
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    theirs = peft.PeftModel.from_pretrained(tiny("gpt2")[0], tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).loss, model(**batch).loss)


@pytest.mark.parametrize("projection", [False, True], ids=["direct", "mlp"])
def test_peftkit_loads_peft_files(projection, tmp_path):
    base, tokenizer = tiny("qwen2")
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=projection
    )
    theirs = peft.get_peft_model(base, config)
    theirs.save_pretrained(tmp_path / "peft")
    fresh, _ = tiny("qwen2")
    ours = peftkit.load(fresh, tmp_path / "peft")
    batch = batch_for("qwen2", tokenizer)
    with torch.no_grad():
        expected, got = theirs.eval()(**batch), ours.eval()(**batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got.logits[real], expected.logits[real], atol=1e-5, rtol=0)


def _as_prefix_rows(cache: transformers.DynamicCache) -> torch.Tensor:
    """PEFT's stored layout (P, layers * 2 * kv_heads * head_dim) of a one-row KV cache."""
    per_layer = []
    for layer in cache.layers:
        per_layer += [layer.keys[0].permute(1, 0, 2), layer.values[0].permute(1, 0, 2)]
    rows = torch.stack(per_layer, dim=1)  # (P, 2 * layers, heads, head_dim)
    return rows.reshape(rows.shape[0], -1)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_prefix_of_real_text_equals_the_text_itself(family):
    """Closed form: with the KV cache of text S as the prefix, the tuned model on X gives the base
    model's logits for S + X at the X positions (decoders see S only through its keys/values)."""
    base, tokenizer = tiny(family)
    context = tokenizer(["once upon"], return_tensors="pt")["input_ids"]
    text = tokenizer(["a time there"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = base(input_ids=torch.cat([context, text], 1)).logits[:, context.shape[1] :]
        cache = base(input_ids=context, use_cache=True).cache
    count = context.shape[1]
    model = peftkit.apply(base, PrefixTuningConfig(num_virtual_tokens=count))
    peftkit.api.applied(model).method.load_state_dict(
        model, {"prompt_embeddings": _as_prefix_rows(cache)}
    )
    with torch.no_grad():
        got = model(input_ids=text, attention_mask=torch.ones_like(text)).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_grouped_query_layout_matches_peft():
    """Llama/Qwen2 with 2 key/value heads for 4 query heads: the prefix has the key/value width."""
    base, _ = tiny("llama")
    config = PrefixTuningConfig(num_virtual_tokens=3)
    model = peftkit.apply(base, config)
    saved = peftkit.api.applied(model).method.saved_config(model, config)
    rows = peftkit.api.applied(model).method.state_dict(model)["prompt_embeddings"]
    head_dim = 32 // 4
    assert rows.shape == (3, 2 * 2 * 2 * head_dim)  # layers * (k, v) * kv_heads * head_dim
    assert saved["num_attention_heads"] == 2 and saved["token_dim"] == 2 * head_dim
    reference = peft.get_peft_model(
        tiny("llama")[0], peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    )
    expected = reference.peft_config["default"]
    assert (saved["token_dim"], saved["num_attention_heads"], saved["num_layers"]) == (
        expected.token_dim,
        expected.num_attention_heads,
        expected.num_layers,
    )


def test_mlp_is_trained_then_folded_for_saving(tmp_path):
    model, batch = _stepped("llama", mlp=16)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"virtual.embedding.weight", "virtual.transform.0.weight"} <= names
    with torch.no_grad():
        before = model(**batch).logits
    peftkit.save(model, tmp_path / "adapter")
    config = peftkit.io.read_json(tmp_path / "adapter" / "adapter_config.json", "config")
    assert config["prefix_projection"] is False and config["peft_type"] == "PREFIX_TUNING"
    fold(model)
    assert model.virtual.transform is None
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "virtual.embedding.weight"
    ]
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("count", [0, -1])
def test_fewer_than_one_virtual_token_is_refused(count):
    with pytest.raises(ConfigError, match="num_virtual_tokens must be at least 1"):
        PrefixTuningConfig(num_virtual_tokens=count)
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        peftkit.config_for("prefix_tuning", num_virtual_tokens=count)
    with pytest.raises(ConfigError, match="encoder_hidden_size"):
        PrefixTuningConfig(encoder_hidden_size=0)


def test_model_without_a_transformers_layout_is_refused():
    with pytest.raises(TargetError, match="no transformers config"):
        peftkit.apply(torch.nn.Linear(4, 4), PrefixTuningConfig())


def test_sliding_window_layers_are_refused():
    config = tiny_config("qwen2")
    config.layer_types = ["full_attention", "sliding_attention"]
    model = transformers.Qwen2ForCausalLM(config)
    with pytest.raises(TargetError, match="sliding_attention layers"):
        peftkit.apply(model, PrefixTuningConfig())


def test_head_size_peft_cannot_lay_out_is_refused():
    config = tiny_config("t5")
    config.d_kv = 16  # 4 heads x 16 = 64 != d_model 32: PEFT's token_dim / heads would be 8
    model = transformers.T5ForConditionalGeneration(config)
    with pytest.raises(TargetError, match="prefix tuning cannot serve this model"):
        peftkit.apply(model, PrefixTuningConfig())


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_prompt_too_long_after_virtual_tokens_is_refused(family):
    base, _ = tiny(family)  # 256 positions
    model = peftkit.apply(base, PrefixTuningConfig(num_virtual_tokens=6))
    with torch.no_grad():
        model(input_ids=torch.randint(3, 250, (1, 250)))  # 250 + 6 = 256 fits
    with pytest.raises(DataError, match="beyond this model's maximum of 256 positions"):
        model(input_ids=torch.randint(3, 250, (1, 251)))
    with pytest.raises(DataError, match="at most 250 tokens"):
        model.generate(input_ids=torch.randint(3, 250, (1, 249)), max_new_tokens=4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradient_checkpointing_gives_the_same_loss_and_gradient(family):
    """transformers' checkpointed layers drop the cache (where PEFT keeps the prefix, so PEFT's
    prefix is lost under checkpointing); peftkit hands each attention its prefix itself."""
    results = []
    for checkpointing in (False, True):
        base, tokenizer = tiny(family)
        torch.manual_seed(1)
        model = peftkit.apply(base, PrefixTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8))
        if checkpointing:
            base.gradient_checkpointing_enable()
        runs, layers = count_layer_runs(base)
        model.train()
        loss = model(**batch_for(family, tokenizer)).loss
        loss.backward()
        # every layer ran once, and under checkpointing once more in backward (the recompute)
        assert len(runs) == (2 if checkpointing else 1) * layers, "checkpointing did not run"
        grads = [p.grad.clone() for p in model.virtual.parameters()]
        results.append((loss.detach(), grads))
    (loss, grads), (checkpointed_loss, checkpointed_grads) = results
    torch.testing.assert_close(checkpointed_loss, loss, atol=1e-6, rtol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads)
    for plain, checkpointed in zip(grads, checkpointed_grads, strict=True):
        torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)


def test_merge_is_refused_with_a_reason():
    base, _ = tiny("gpt2")
    model = peftkit.apply(base, PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(AdapterError, match="Prefix tuning cannot be merged"):
        peftkit.merge(model)
