"""Prompt tuning (contract rows, PEFT reading our files: test_contract.py): peftkit reading PEFT's
files, labels, init, bad input."""

import peft
import pytest
import torch
import torch.nn.functional as F

import peftkit
from contract import batch_for, count_layer_runs, tiny
from peftkit.errors import AdapterError, ConfigError, DataError
from peftkit.methods.virtual_tokens.prompt import PromptTuningConfig


def test_peftkit_loads_peft_files(tmp_path):
    """A folder written by PEFT itself loads through peftkit.load with the same outputs."""
    base, tokenizer = tiny("llama")
    theirs = peft.get_peft_model(
        base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    )
    theirs.save_pretrained(tmp_path / "peft")
    fresh, _ = tiny("llama")
    ours = peftkit.load(fresh, tmp_path / "peft")
    batch = batch_for("llama", tokenizer)
    with torch.no_grad():
        expected = theirs.eval()(**batch)
        got = ours.eval()(**batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got.logits[real], expected.logits[:, 3:][real], atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=1e-5, rtol=0)


def test_causal_logits_and_labels_line_up_with_input_ids():
    """Logits cover the caller's tokens only; the loss is the base model's shifted cross-entropy
    over prompt + input, so the first token is scored from the last virtual position (as PEFT)."""
    base, tokenizer = tiny("gpt2")
    model = peftkit.apply(base, PromptTuningConfig(num_virtual_tokens=5))
    batch = batch_for("gpt2", tokenizer)  # right padded: positions are plain 0, 1, 2, ...
    with torch.no_grad():
        out = model(**batch)
        prompt = model.virtual.embedding.weight.expand(3, -1, -1)
        embeds = torch.cat([prompt, base.get_input_embeddings()(batch["input_ids"])], dim=1)
        mask = torch.cat([torch.ones(3, 5, dtype=torch.long), batch["attention_mask"]], dim=1)
        full = base.transformer(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        full_logits = base.lm_head(full)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[real], full_logits[:, 5:][real], atol=1e-5, rtol=1e-5)
    expected = F.cross_entropy(
        full_logits[:, 4:-1].reshape(-1, full_logits.shape[-1]),
        batch["labels"].reshape(-1),
        ignore_index=-100,
    )
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)


def test_only_the_prompt_trains_and_base_weights_stay():
    base, tokenizer = tiny("llama")
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = peftkit.apply(base, PromptTuningConfig(num_virtual_tokens=3))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["virtual.embedding.weight"]
    assert peftkit.summary(model).trainable == 3 * 32
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model.train()
    model(**batch_for("llama", tokenizer)).loss.backward()
    optimizer.step()
    for name, parameter in base.named_parameters():
        assert torch.equal(parameter, before[name]), name


def test_init_from_text_uses_the_token_embeddings_repeated():
    base, tokenizer = tiny("llama")
    config = PromptTuningConfig(
        num_virtual_tokens=5, init="text", init_text="hi!", tokenizer="tiny-llama"
    )
    model = peftkit.apply(base, config)
    ids = tokenizer("hi!", add_special_tokens=False)["input_ids"]  # three byte tokens
    expected_ids = (ids * 2)[:5]
    words = base.get_input_embeddings().weight
    torch.testing.assert_close(model.virtual.embedding.weight, words[expected_ids])


def test_init_from_token_ids_needs_no_tokenizer():
    base, _ = tiny("gpt2")
    config = PromptTuningConfig(num_virtual_tokens=2, init="text", init_token_ids=[7, 9, 11])
    model = peftkit.apply(base, config)
    torch.testing.assert_close(model.virtual.embedding.weight, base.transformer.wte.weight[[7, 9]])


def test_random_init_is_at_the_scale_of_the_word_embeddings():
    base, _ = tiny("llama")
    model = peftkit.apply(base, PromptTuningConfig(num_virtual_tokens=200))
    scale = base.get_input_embeddings().weight.std()
    assert 0.8 < model.virtual.embedding.weight.std() / scale < 1.2


def test_recipe_options_build_the_config():
    config = peftkit.config_for(
        "prompt_tuning", num_virtual_tokens="8", init="text", init_text="Sentiment:"
    )
    assert config == PromptTuningConfig(num_virtual_tokens=8, init="text", init_text="Sentiment:")


@pytest.mark.parametrize("count", [0, -3])
def test_fewer_than_one_virtual_token_is_refused(count):
    with pytest.raises(ConfigError, match="num_virtual_tokens must be at least 1"):
        PromptTuningConfig(num_virtual_tokens=count)
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        peftkit.config_for("prompt_tuning", num_virtual_tokens=count)


def test_bad_init_is_refused():
    with pytest.raises(ConfigError, match="init must be one of"):
        PromptTuningConfig(init="vocab")
    with pytest.raises(ConfigError, match="init_text"):
        PromptTuningConfig(init="text")
    base, _ = tiny("llama")  # tiny models have no folder to find a tokenizer in
    with pytest.raises(ConfigError, match="needs a tokenizer"):
        peftkit.apply(base, PromptTuningConfig(init="text", init_text="hello"))
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        peftkit.apply(base, PromptTuningConfig(init="text", init_token_ids=[5, 100000]))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prompt_too_long_after_virtual_tokens_is_refused(family):
    base, _ = tiny(family)  # 256 positions
    model = peftkit.apply(base, PromptTuningConfig(num_virtual_tokens=10))
    fits = torch.randint(3, 250, (1, 246))
    with torch.no_grad():
        model(input_ids=fits)  # 246 + 10 = 256: fits exactly
    with pytest.raises(DataError, match="beyond this model's maximum of 256 positions"):
        model(input_ids=torch.randint(3, 250, (1, 247)))
    with pytest.raises(DataError, match="at most 246 tokens"):
        model.generate(input_ids=fits, max_new_tokens=3, do_sample=False)


def test_merge_is_refused_with_a_reason():
    base, _ = tiny("llama")
    model = peftkit.apply(base, PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(AdapterError, match="Prompt tuning cannot be merged"):
        peftkit.merge(model)


def test_gradient_checkpointing_gives_the_same_gradient():
    """Prompt tuning trains under gradient checkpointing (the prompt is an input, not cache)."""
    grads = []
    for checkpointing in (False, True):
        base, tokenizer = tiny("llama")
        model = peftkit.apply(base, PromptTuningConfig(num_virtual_tokens=3))
        if checkpointing:
            base.gradient_checkpointing_enable()
        runs, layers = count_layer_runs(base)
        model.train()
        model(**batch_for("llama", tokenizer)).loss.backward()
        # every layer ran once, and under checkpointing once more in backward (the recompute)
        assert len(runs) == (2 if checkpointing else 1) * layers, "checkpointing did not run"
        grads.append(model.virtual.embedding.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_remove_gives_back_the_untouched_base(method):
    base, tokenizer = tiny("llama")
    batch = batch_for("llama", tokenizer)
    with torch.no_grad():
        expected = base(**batch).logits
    model = peftkit.apply(base, method, num_virtual_tokens=3)
    assert not any(p.requires_grad for p in base.parameters())
    restored = peftkit.api.applied(model).method.remove(model)
    assert restored is base and all(p.requires_grad for p in base.parameters())
    with torch.no_grad():
        torch.testing.assert_close(restored(**batch).logits, expected)


def test_peft_decoder_prompt_for_seq2seq_is_refused_clearly(tmp_path):
    """PEFT's seq2seq default also prompts the decoder (2 submodules); peftkit says it cannot."""
    base, _ = tiny("t5")
    theirs = peft.get_peft_model(
        base, peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)
    )
    theirs.save_pretrained(tmp_path / "peft")
    fresh, _ = tiny("t5")
    with pytest.raises(AdapterError, match="num_transformer_submodules=2"):
        peftkit.load(fresh, tmp_path / "peft")


def test_positional_input_ids_work():
    base, tokenizer = tiny("qwen2")
    model = peftkit.apply(base, PromptTuningConfig(num_virtual_tokens=3)).eval()
    ids = tokenizer(["a cat"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(input_ids=ids).logits)
