"""Proxy-Tuning decoding: the logit arithmetic, its plumbing through generate, and bad input.

References are independent of the code under test: the closed form base + alpha * (expert -
anti_expert), plain full-sequence forwards, and each model's own `generate`."""

import copy
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, StoppingCriteriaList
from transformers.generation.stopping_criteria import EosTokenCriteria

import peftkit
from peftkit.decoding import (
    ProxyDecodingConfig,
    ProxyLogitsProcessor,
    VocabularyError,
    WithoutAdapter,
    proxy_generate,
    proxy_generate_ids,
    proxy_logits,
)
from peftkit.decoding.prompts import prompt_batch
from peftkit.errors import ConfigError
from peftkit.models import load_model, tiny_config, tiny_tokenizer

FAMILIES = ["llama", "gpt2", "qwen2"]
PROMPTS = ["The cat", "A much longer prompt, so the batch needs padding"]
NEW_TOKENS = 10


def tiny(family, seed, vocab_size=None):
    """A tiny random causal LM in eval mode (different seeds: different weights, same tokenizer)."""
    if vocab_size is None:
        model, tokenizer = load_model(f"tiny-{family}", "causal-lm", seed=seed)
    else:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=vocab_size))
        tokenizer = tiny_tokenizer()
    return model.eval(), tokenizer


def own_greedy(model, tokenizer, prompts=PROMPTS, new_tokens=NEW_TOKENS, **options):
    """The model's own greedy continuation through transformers' generate (the reference)."""
    batch = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    return own_greedy_ids(
        model, tokenizer, batch["input_ids"], batch["attention_mask"], new_tokens, **options
    )


def own_greedy_ids(model, tokenizer, input_ids, attention_mask, new_tokens=NEW_TOKENS, **options):
    """Greedy continuation of an already tokenized, left-padded batch."""
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **options,
    )
    return output[:, input_ids.shape[1] :]


def left_pad(rows, pad_id=0):
    """A left-padded batch from lists of token ids, built by hand."""
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return input_ids, attention_mask


# --- the arithmetic -------------------------------------------------------------------------------


def test_proxy_logits_equal_closed_form_on_shared_ids():
    base, expert, anti_expert = torch.randn(3, 12), torch.randn(3, 10), torch.randn(3, 11)
    combined = proxy_logits(base, expert, anti_expert, alpha=0.7)
    expected = base[:, :10] + 0.7 * (expert - anti_expert[:, :10])
    assert combined.shape == base.shape
    torch.testing.assert_close(combined[:, :10], expected)
    assert torch.isneginf(combined[:, 10:]).all()  # padded ids of the larger base never win


def test_processor_equals_closed_form_at_every_step():
    expert, _ = tiny("llama", seed=2)
    anti_expert, _ = tiny("llama", seed=3)
    sequence = torch.tensor([[5, 70, 80, 90, 100]])
    processor = ProxyLogitsProcessor(expert, anti_expert, 0.5, {"input_ids": sequence})
    with torch.no_grad():
        for next_token in (17, 230, 4):
            scores = torch.randn(1, 260)
            combined = processor(sequence, scores.clone())
            # Reference: a plain full forward of the whole sequence, no cache, no masks.
            shift = expert(sequence).logits[:, -1] - anti_expert(sequence).logits[:, -1]
            torch.testing.assert_close(combined, scores + 0.5 * shift, atol=1e-5, rtol=1e-5)
            sequence = torch.cat([sequence, torch.tensor([[next_token]])], dim=-1)


# --- decoding through generate --------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_zero_generates_exactly_the_base_output(family):
    base, tokenizer = tiny(family, seed=1)
    expert, _ = tiny(family, seed=2)
    anti_expert, _ = tiny(family, seed=3)
    got = proxy_generate_ids(
        base, expert, anti_expert, tokenizer, PROMPTS, alpha=0.0, max_new_tokens=NEW_TOKENS
    )
    assert torch.equal(got, own_greedy(base, tokenizer))


@pytest.mark.parametrize("family", FAMILIES)
def test_base_as_anti_expert_with_alpha_one_generates_the_expert_output(family):
    base, tokenizer = tiny(family, seed=1)
    expert, _ = tiny(family, seed=2)
    got = proxy_generate_ids(base, expert, base, tokenizer, PROMPTS, max_new_tokens=NEW_TOKENS)
    expected = own_greedy(expert, tokenizer)
    assert not torch.equal(expected, own_greedy(base, tokenizer))  # the check can fail
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_and_uncached_decoding_agree(family):
    models = [tiny(family, seed=seed)[0] for seed in (1, 2, 3)]
    tokenizer = tiny_tokenizer()
    cached = proxy_generate_ids(*models, tokenizer, PROMPTS, alpha=0.8, max_new_tokens=16)
    uncached = proxy_generate_ids(
        *models, tokenizer, PROMPTS, alpha=0.8, max_new_tokens=16, use_cache=False
    )
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_with_early_stops_equals_one_by_one(family):
    models = [tiny(family, seed=seed)[0] for seed in (1, 2, 3)]
    tokenizer = tiny_tokenizer()
    prompts = ["Hi", "A longer prompt here", "Medium one"]
    alone = [proxy_generate_ids(*models, tokenizer, [p], max_new_tokens=12)[0] for p in prompts]
    # Stop on a token the first prompt produces early (at step 2 or later, not before).
    first = alone[0].tolist()
    stop_at = next(k for k in range(2, len(first)) if first[k] not in first[:k])
    stop = StoppingCriteriaList([EosTokenCriteria(eos_token_id=first[stop_at])])

    def generate(batch):
        return proxy_generate_ids(
            *models, tokenizer, batch, max_new_tokens=12, stopping_criteria=stop
        )

    alone = [generate([prompt])[0] for prompt in prompts]
    batched = generate(prompts)
    assert len(alone[0]) == stop_at + 1 < batched.shape[1]  # one row really finished early
    for row, single in zip(batched, alone, strict=True):
        assert torch.equal(row[: len(single)], single)
        assert (row[len(single) :] == tokenizer.pad_token_id).all()


def test_processor_used_directly_in_generate_and_reused():
    base, tokenizer = tiny("llama", seed=1)
    expert, _ = tiny("llama", seed=2)
    batch = tokenizer(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    # base = anti-expert, alpha = 1: the expert's own output, on the base's own generate.
    processor = ProxyLogitsProcessor(expert, base, 1.0, batch)
    expected = own_greedy(expert, tokenizer)
    for _ in range(2):  # a second generate call must start fresh caches, not continue old ones
        got = own_greedy(base, tokenizer, logits_processor=[processor])
        assert torch.equal(got, expected)
    processor.reset()
    assert processor.streams is None
    assert torch.equal(own_greedy(base, tokenizer, logits_processor=[processor]), expected)


def test_sampling_warpers_act_on_the_proxy_logits():
    base, tokenizer = tiny("llama", seed=1)
    expert, _ = tiny("llama", seed=2)
    anti_expert, _ = tiny("llama", seed=3)
    args = (base, expert, anti_expert, tokenizer, PROMPTS)
    greedy = proxy_generate_ids(*args, max_new_tokens=NEW_TOKENS)
    # top_k=1 keeps one token: the argmax of whatever the warper sees. Had it run before the proxy
    # arithmetic, this would be the base model's greedy output instead.
    top1 = proxy_generate_ids(*args, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=1, seed=5)
    assert torch.equal(top1, greedy)
    assert not torch.equal(greedy, own_greedy(base, tokenizer))
    # A near-zero temperature makes sampling greedy too; top_p=1e-6 keeps only the best token.
    cold = proxy_generate_ids(*args, max_new_tokens=NEW_TOKENS, do_sample=True, temperature=1e-4)
    assert torch.equal(cold, greedy)
    nucleus = proxy_generate_ids(*args, max_new_tokens=NEW_TOKENS, do_sample=True, top_p=1e-6)
    assert torch.equal(nucleus, greedy)


def test_sampling_is_reproducible_with_a_seed():
    models = [tiny("gpt2", seed=seed)[0] for seed in (1, 2, 3)]
    tokenizer = tiny_tokenizer()
    options = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.5, "seed": 11}
    first = proxy_generate(*models, tokenizer, PROMPTS, **options)
    assert first == proxy_generate(*models, tokenizer, PROMPTS, **options)
    assert first != proxy_generate(*models, tokenizer, PROMPTS, **{**options, "seed": 12})
    assert all(isinstance(text, str) for text in first) and len(first) == len(PROMPTS)


# --- each model its own prompt --------------------------------------------------------------------

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_chat_renders_only_the_expert_prompt_with_its_own_template():
    base, tokenizer = tiny("qwen2", seed=1)
    expert, _ = tiny("qwen2", seed=2)
    expert_tokenizer = copy.deepcopy(tokenizer)
    expert_tokenizer.chat_template = TEMPLATE
    # base = anti-expert and alpha = 1 leaves the expert's logits on the expert's own prompt.
    got = proxy_generate_ids(
        base, expert, base, tokenizer, PROMPTS, max_new_tokens=NEW_TOKENS, chat=True,
        expert_tokenizer=expert_tokenizer,
    )  # fmt: skip
    rendered = [tokenizer(f"<|user|>{p}<|assistant|>")["input_ids"] for p in PROMPTS]
    expected = own_greedy_ids(expert, tokenizer, *left_pad(rendered))
    assert torch.equal(got, expected)


def test_each_model_can_take_its_own_token_ids():
    base, tokenizer = tiny("llama", seed=1)
    expert, _ = tiny("llama", seed=2)
    expert_rows = [[2, 40, 41, 42, 43, 44, 45], [2, 50]]  # lengths unlike the base prompts
    got = proxy_generate_ids(
        base, expert, base, tokenizer, PROMPTS, max_new_tokens=NEW_TOKENS,
        expert_prompts=expert_rows,
    )  # fmt: skip
    assert torch.equal(got, own_greedy_ids(expert, tokenizer, *left_pad(expert_rows)))


# --- the cheap variant: one set of small weights, adapter on and off ------------------------------


def lora_expert(seed):
    """A tiny Llama with a LoRA adapter whose B is non-zero (an adapter that changes outputs)."""
    model, _ = tiny("llama", seed=seed)
    expert = peftkit.apply(model, peftkit.LoraConfig(rank=4, dropout=0.0))
    with torch.no_grad():
        for name, parameter in expert.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    return expert.eval()


def test_cheap_variant_equals_separate_untuned_copy():
    base, tokenizer = tiny("llama", seed=1)
    expert = lora_expert(seed=2)
    untuned_copy, _ = tiny("llama", seed=2)  # the same weights the adapter sits on
    cheap = proxy_generate_ids(
        base, expert, WithoutAdapter(expert), tokenizer, PROMPTS, max_new_tokens=NEW_TOKENS
    )
    separate = proxy_generate_ids(
        base, expert, untuned_copy, tokenizer, PROMPTS, max_new_tokens=NEW_TOKENS
    )
    assert torch.equal(cheap, separate)
    # And the closed form: with the untuned model as base, alpha = 1 leaves the expert alone.
    as_expert = proxy_generate_ids(
        untuned_copy, expert, WithoutAdapter(expert), tokenizer, PROMPTS, max_new_tokens=NEW_TOKENS
    )
    expected = own_greedy(expert, tokenizer)
    assert not torch.equal(expected, own_greedy(untuned_copy, tokenizer))
    assert torch.equal(as_expert, expected)
    assert expert.get_model_status().enabled is True  # the adapter is switched back on


# --- vocabularies ---------------------------------------------------------------------------------


def test_padded_base_vocabulary_is_aligned_on_shared_ids():
    base, tokenizer = tiny("llama", seed=1, vocab_size=320)  # 60 padding rows past the tokenizer
    expert, _ = tiny("llama", seed=2)
    anti_expert, _ = tiny("llama", seed=3)
    got = proxy_generate_ids(base, expert, anti_expert, tokenizer, PROMPTS, alpha=0.0)
    expected = own_greedy(base, tokenizer, new_tokens=64, suppress_tokens=list(range(260, 320)))
    assert torch.equal(got, expected)


def test_padded_expert_vocabulary_is_aligned_on_shared_ids():
    base, tokenizer = tiny("gpt2", seed=1)
    expert, _ = tiny("gpt2", seed=2, vocab_size=300)
    got = proxy_generate_ids(base, expert, base, tokenizer, PROMPTS, max_new_tokens=NEW_TOKENS)
    expected = own_greedy(expert, tokenizer, suppress_tokens=list(range(260, 300)))
    assert torch.equal(got, expected)


# --- bad input ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trio():
    return tuple(tiny("llama", seed=seed)[0] for seed in (1, 2, 3)), tiny_tokenizer()


def test_mismatched_tokenizer_is_refused(trio):
    models, tokenizer = trio
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<extra>"])  # a different token-to-id map
    with pytest.raises(VocabularyError, match="expert tokenizer differs from the base"):
        proxy_generate(*models, tokenizer, PROMPTS, expert_tokenizer=other)


def test_model_too_small_for_the_tokenizer_is_refused(trio):
    (base, _, anti_expert), tokenizer = trio
    small, _ = tiny("llama", seed=2, vocab_size=200)
    with pytest.raises(VocabularyError, match="expert model scores 200 ids .* 260 tokens"):
        proxy_generate(base, small, anti_expert, tokenizer, PROMPTS)


def test_expert_without_anti_expert_is_refused(trio):
    (base, expert, anti_expert), tokenizer = trio
    with pytest.raises(ConfigError, match="anti_expert is missing.*WithoutAdapter"):
        proxy_generate(base, expert, None, tokenizer, PROMPTS)
    with pytest.raises(ConfigError, match="expert is missing"):
        proxy_generate(base, None, anti_expert, tokenizer, PROMPTS)
    with pytest.raises(ConfigError, match="anti_expert is missing"):
        ProxyLogitsProcessor(expert, None, 1.0, {"input_ids": torch.tensor([[5]])})


@pytest.mark.parametrize("alpha", [math.nan, math.inf, -math.inf, "1.0", None, True])
def test_alpha_that_is_not_a_finite_number_is_refused(trio, alpha):
    models, tokenizer = trio
    with pytest.raises(ConfigError, match="alpha must be a finite number"):
        proxy_generate(*models, tokenizer, PROMPTS, alpha=alpha)
    with pytest.raises(ConfigError, match="alpha must be a finite number"):
        ProxyDecodingConfig(alpha=alpha)
    with pytest.raises(ConfigError, match="alpha must be a finite number"):
        proxy_logits(torch.zeros(1, 4), torch.zeros(1, 4), torch.zeros(1, 4), alpha)


def test_other_bad_options_are_refused(trio):
    models, tokenizer = trio
    with pytest.raises(ConfigError, match="Did you mean 'temperature'"):
        proxy_generate(*models, tokenizer, PROMPTS, temprature=0.7)
    for options, message in [
        ({"temperature": 0.0}, "temperature must be a positive"),
        ({"top_p": 1.5}, "top_p must be in"),
        ({"top_k": 0}, "top_k must be at least 1"),
        ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
        ({"max_new_tokens": 4, "min_new_tokens": 5}, "min_new_tokens must be between 0 and"),
    ]:
        with pytest.raises(ConfigError, match=message):
            proxy_generate(*models, tokenizer, PROMPTS, **options)
    with pytest.raises(ConfigError, match="non-empty list"):
        proxy_generate(*models, tokenizer, "a single string")
    with pytest.raises(ConfigError, match="expert_prompts has 1 entries but there are 2"):
        proxy_generate(*models, tokenizer, PROMPTS, expert_prompts=["one"])
    messages = [[{"role": "user", "content": "Hi"}]]
    with pytest.raises(ConfigError, match="chat template only where chat=True"):
        proxy_generate(*models, tokenizer, messages, chat=True)
    with pytest.raises(ConfigError, match="needs a model whose adapter can be switched off"):
        WithoutAdapter(models[1])


def test_chat_prompts_without_a_template_use_the_fallback_the_chat_task_trains_with(trio):
    (_, _, _), tokenizer = trio
    assert tokenizer.chat_template is None
    batch = prompt_batch(tokenizer, ["Hi"], chat=True, device=torch.device("cpu"))
    written = tokenizer("<|user|>\nHi\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0].tolist() == written


def test_processor_refuses_a_batch_it_has_no_prompts_for(trio):
    (_, expert, anti_expert), _ = trio
    processor = ProxyLogitsProcessor(expert, anti_expert, 1.0, {"input_ids": torch.tensor([[5]])})
    with pytest.raises(ConfigError, match="1 rows but the base generates 2"):
        processor(torch.tensor([[5], [6]]), torch.zeros(2, 260))
