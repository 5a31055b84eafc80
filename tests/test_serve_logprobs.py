"""Log-probabilities, echo and n > 1 through the real OpenAI client (issue 27, item 13): what
lm-evaluation-harness's `local-completions` model reads for log-likelihood tasks. The prompt's
and the completion's log-probs equal a plain forward of the model with that adapter, for rows
batched together, left-padded and prefilled in chunks."""

from __future__ import annotations

import openai
import pytest
import torch
from serve_support import MODEL, client, make_adapter

import peftkit.api as api
from peftkit.models import load_model
from peftkit.serve.server import ServeOptions, running

IDS = [[5, 17, 230, 41, 9, 77, 120, 3, 64], [250, 11, 40]]  # two prompts of different lengths


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("adapters") / "a", seed=1, rank=2)


@pytest.fixture(scope="module", params=[512, 4], ids=["whole", "chunked"])
def server(folder, request):
    options = ServeOptions(
        model=MODEL, adapters={"a": folder}, port=0, max_prefill_tokens=request.param
    )
    with running(options) as served:
        yield served


def reference(folder, ids):
    """log_softmax of a plain forward of the base with the adapter, one row alone."""
    model = api.load(load_model(MODEL, "causal-lm")[0], folder).eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def test_echo_gives_every_prompt_token_its_log_prob_as_a_forward_does(server, folder):
    response = client(server.url).completions.create(
        model=f"{MODEL}:a", prompt=IDS, max_tokens=1, temperature=0, echo=True, logprobs=3
    )
    _, tokenizer = load_model(MODEL, "causal-lm")
    for ids, choice in zip(IDS, response.choices, strict=True):
        expected = reference(folder, ids)
        logprobs = choice.logprobs
        assert len(logprobs.token_logprobs) == len(ids) + 1 and logprobs.token_logprobs[0] is None
        assert logprobs.top_logprobs[0] is None
        for k in range(1, len(ids)):
            assert logprobs.token_logprobs[k] == pytest.approx(
                float(expected[k - 1, ids[k]]), abs=1e-4
            )
            # The 3 best and the chosen one, keyed by text (tokens with the same text share one).
            best = expected[k - 1].topk(3).values.tolist() + [logprobs.token_logprobs[k]]
            top = logprobs.top_logprobs[k].values()
            assert max(top) == pytest.approx(best[0], abs=1e-4)
            assert all(min(abs(v - b) for b in best) < 1e-4 for v in top), (top, best)
        generated = int(expected[-1].argmax())  # greedy: the arg max, and the top log-prob
        assert logprobs.token_logprobs[-1] == pytest.approx(float(expected[-1].max()), abs=1e-4)
        assert logprobs.tokens[-1] == tokenizer.decode([generated])
        completion = tokenizer.decode([generated], skip_special_tokens=True)
        assert choice.text == tokenizer.decode(ids) + completion
        assert logprobs.text_offset[1] == len(logprobs.tokens[0])


def test_logprobs_zero_gives_the_chosen_tokens_log_probs(server, folder):
    response = client(server.url).completions.create(
        model=f"{MODEL}:a", prompt=IDS[0], max_tokens=4, temperature=0, logprobs=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    logprobs = response.choices[0].logprobs
    assert len(logprobs.token_logprobs) == 4 and all(v <= 0 for v in logprobs.token_logprobs)
    assert all(list(top.values()) == [v] for top, v in
               zip(logprobs.top_logprobs, logprobs.token_logprobs, strict=True))  # fmt: skip


def test_n_choices_per_prompt_each_with_its_own_seed(server):
    api_client = client(server.url)
    many = api_client.completions.create(
        model=MODEL, prompt=["a dog", "the cat"], max_tokens=6, temperature=1.0, seed=11, n=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [c.index for c in many.choices] == list(range(6))
    for i, prompt in enumerate(["a dog", "the cat"]):
        for j in range(3):
            alone = api_client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=6, temperature=1.0, seed=11 + j,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            assert many.choices[i * 3 + j].text == alone.choices[0].text
    assert len({c.text for c in many.choices[:3]}) > 1
    one_each = api_client.completions.create(model=MODEL, prompt=["a dog", "the cat"], max_tokens=1)
    assert many.usage.prompt_tokens == one_each.usage.prompt_tokens  # each prompt counted once
    assert many.usage.completion_tokens == 6 * 6


def test_chat_logprobs_with_top_alternatives(server):
    response = client(server.url).chat.completions.create(
        model=f"{MODEL}:a", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
        temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True},
    )  # fmt: skip
    content = response.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy: the best
        values = [top.logprob for top in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)


def test_logprobs_on_a_stream_are_refused_by_name(server):
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        list(client(server.url).completions.create(
            model=MODEL, prompt="x", max_tokens=2, logprobs=1, stream=True
        ))  # fmt: skip
