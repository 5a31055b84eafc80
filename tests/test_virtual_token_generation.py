"""generate() with prompt and prefix tuning equals the tuned model's own teacher-forced forward.

This is the check PEFT 0.21.2 fails on transformers 5.24 (it passes the renamed
`past_key_values` argument, so a Llama prefix is ignored and prompt tuning goes wrong from the
second token). At every greedy step, with the KV cache on and off, on a left-padded batch, the
logits generate() used must equal a full forward over the sequence so far. Proven on
transformers 5.24; a transformers release that changes how models take a cache fails here."""

import inspect

import pytest
import torch
import transformers

import peftkit
from contract import batch_for, tiny
from peftkit.methods.virtual_tokens.prefix import PrefixTuningConfig
from peftkit.methods.virtual_tokens.prompt import PromptTuningConfig

PROVEN_TRANSFORMERS = "5.24"
DECODERS = ["gpt2", "llama", "qwen2"]
CONFIGS = {
    "prompt": PromptTuningConfig(num_virtual_tokens=4),
    "prefix": PrefixTuningConfig(num_virtual_tokens=4),
}
STEPS = 5


def _tuned(family: str, which: str) -> tuple[torch.nn.Module, torch.nn.Module, object]:
    """(base logits model, tuned model, tokenizer) for a family; the base is a separate copy."""
    reference, _ = tiny(family)
    base, tokenizer = tiny(family)
    model = peftkit.apply(base, CONFIGS[which])
    return reference, model.eval(), tokenizer


def _greedy(model, batch, use_cache: bool):
    """Greedy generation that keeps the logits of every step."""
    with torch.no_grad():
        return model.generate(
            **batch,
            max_new_tokens=STEPS,
            min_new_tokens=STEPS,
            do_sample=False,
            use_cache=use_cache,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )


def test_transformers_takes_the_cache_as_peftkit_expects():
    """The interface the hooks rely on: models take a `cache` keyword (transformers >= 5.24)."""
    for model_class in (transformers.LlamaForCausalLM, transformers.T5ForConditionalGeneration):
        parameters = inspect.signature(model_class.forward).parameters
        assert "cache" in parameters, (
            f"{model_class.__name__}.forward has no `cache` argument in transformers "
            f"{transformers.__version__} (proven: {PROVEN_TRANSFORMERS}); peftkit's virtual-token "
            "hooks (src/peftkit/methods/virtual_tokens/shared.py) must follow the new name."
        )


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("which", list(CONFIGS))
@pytest.mark.parametrize("family", DECODERS)
def test_decoder_generation_matches_teacher_forcing(family, which, use_cache):
    reference, model, tokenizer = _tuned(family, which)
    tokenizer.padding_side = "left"
    batch = dict(tokenizer(["the cat sat on", "a dog"], return_tensors="pt", padding=True))
    assert (batch["attention_mask"] == 0).any(), "the batch must be padded"
    out = _greedy(model, batch, use_cache)
    length = batch["input_ids"].shape[1]
    assert out.sequences.shape[1] == length + STEPS
    for step, step_logits in enumerate(out.logits):
        sequence = out.sequences[:, : length + step]
        mask = torch.cat([batch["attention_mask"], torch.ones(2, step, dtype=torch.long)], 1)
        with torch.no_grad():
            forward = model(input_ids=sequence, attention_mask=mask).logits[:, -1]
        torch.testing.assert_close(step_logits, forward, atol=1e-4, rtol=1e-4)
    # The virtual tokens are really in play: the base model alone would decode differently.
    with torch.no_grad():
        plain = reference(**batch).logits[:, -1]
    assert not torch.allclose(out.logits[0], plain, atol=1e-3), "virtual tokens were ignored"


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("which", list(CONFIGS))
def test_t5_generation_matches_teacher_forcing(which, use_cache):
    reference, model, tokenizer = _tuned("t5", which)
    batch = dict(tokenizer(["translate the cat sat", "a dog"], return_tensors="pt", padding=True))
    out = _greedy(model, batch, use_cache)
    for step, step_logits in enumerate(out.logits):
        decoder_ids = out.sequences[:, : step + 1]
        with torch.no_grad():
            forward = model(**batch, decoder_input_ids=decoder_ids).logits[:, -1]
        torch.testing.assert_close(step_logits, forward, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        plain = reference(**batch, decoder_input_ids=out.sequences[:, :1]).logits[:, -1]
    assert not torch.allclose(out.logits[0], plain, atol=1e-3), "virtual tokens were ignored"


@pytest.mark.parametrize("which", list(CONFIGS))
def test_padding_does_not_change_a_row(which):
    """A left-padded row gets the same logits as the same text alone (positions skip padding)."""
    _, model, tokenizer = _tuned("llama", which)
    tokenizer.padding_side = "left"
    padded = dict(tokenizer(["the cat sat on", "a dog"], return_tensors="pt", padding=True))
    alone = dict(tokenizer(["a dog"], return_tensors="pt"))
    with torch.no_grad():
        batch_logits = model(**padded).logits[1, -alone["input_ids"].shape[1] :]
        alone_logits = model(**alone).logits[0]
    torch.testing.assert_close(batch_logits, alone_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", list(CONFIGS))
def test_beam_search_is_the_same_with_and_without_cache(which):
    """Beams reorder the cache, prefix included: cached and uncached beam search agree."""
    _, model, tokenizer = _tuned("llama", which)
    tokenizer.padding_side = "left"
    batch = dict(tokenizer(["the cat sat on", "a dog"], return_tensors="pt", padding=True))
    results = []
    for use_cache in (True, False):
        with torch.no_grad():
            results.append(
                model.generate(
                    **batch, max_new_tokens=4, num_beams=3, do_sample=False, use_cache=use_cache
                )
            )
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("family", ["gpt2", "t5"])
@pytest.mark.parametrize("which", list(CONFIGS))
def test_disable_adapter_gives_the_base_model(family, which):
    """Inside disable_adapter() the wrapper is the plain base model, forward and generate."""
    reference, model, tokenizer = _tuned(family, which)
    batch = batch_for(family, tokenizer)
    with torch.no_grad():
        expected = reference(**batch).logits
        tuned = model(**batch).logits
        with model.disable_adapter():
            plain = model(**batch).logits
            generated = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert model.adapter_enabled
        torch.testing.assert_close(model(**batch).logits, tuned)
    torch.testing.assert_close(plain, expected)
    assert not torch.allclose(tuned, expected)
    baseline = reference.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, baseline)


@pytest.mark.integration
@pytest.mark.parametrize("which", ["prompt", "prefix"])
def test_smollm2_generation_matches_teacher_forcing(which):
    """The real Llama-architecture model (30 layers, 9 query / 3 key-value heads)."""
    from peftkit.models import load_model

    # Converted once into the cache (`make test` does it first); a missing bundle fails here.
    base, tokenizer = load_model("smollm2-135m", "causal-lm")
    # The prompt starts from real words; its tokenizer comes from the model's own folder.
    config = (
        PromptTuningConfig(num_virtual_tokens=8, init="text", init_text="Answer briefly:")
        if which == "prompt"
        else PrefixTuningConfig(num_virtual_tokens=8)
    )
    model = peftkit.apply(base, config).eval()
    tokenizer.padding_side = "left"
    batch = dict(tokenizer(["The capital of France is", "Hi"], return_tensors="pt", padding=True))
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=3, min_new_tokens=3, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        length = batch["input_ids"].shape[1]
        for step, step_logits in enumerate(out.logits):
            mask = torch.cat([batch["attention_mask"], torch.ones(2, step, dtype=torch.long)], 1)
            sequence = out.sequences[:, : length + step]
            forward = model(input_ids=sequence, attention_mask=mask).logits[:, -1]
            torch.testing.assert_close(step_logits, forward, atol=1e-3, rtol=1e-3)
