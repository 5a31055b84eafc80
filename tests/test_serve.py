"""`peftkit serve` through the real OpenAI client on localhost: completions, chat, streaming,
requests for different adapters decoded in one batch giving the text `peftkit generate` gives
with each adapter alone, adapters loaded and unloaded at run time, Proxy-Tuning per request."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from serve_support import MODEL, call, client, engine_held, make_adapter

from peftkit.cli import main
from peftkit.serve.server import ServeOptions, running

PROMPTS = ["the cat sat on", "a dog", "parameter efficient fine tuning is"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "root": root,
        "a": make_adapter(root / "a", seed=1, rank=2),
        "b": make_adapter(root / "b", seed=2, rank=4, targets=["q_proj", "k_proj", "o_proj"]),
        "c": make_adapter(root / "c", seed=3, rank=3),
        "talk": make_adapter(root / "talk", seed=4, rank=2, task="chat"),
    }


@pytest.fixture(scope="module")
def server(folders):
    options = ServeOptions(
        model=MODEL, adapters={"a": folders["a"], "b": folders["b"]}, port=0,
        adapter_dir=str(folders["root"]), proxy_adapter=folders["c"], max_tokens=64,
    )  # fmt: skip
    with running(options) as served:
        yield served


def generated(tmp_path, prompt, max_tokens, adapter=None, chat=False, task=None):
    """What `peftkit generate` writes for one prompt (greedy), with an adapter or none."""
    out = tmp_path / "generated.json"
    args = ["generate", "--model", MODEL, "--prompt", prompt, "--max-new-tokens", str(max_tokens)]
    args += ["--adapter", adapter] if adapter else []
    args += ["--chat"] if chat else []
    args += ["--task", task] if task else []
    assert main([*args, "--output", str(out)]) == 0
    return json.loads(out.read_text())[0]["generated"]


def complete(url, model, prompt, max_tokens, **options):
    """One greedy completion's text through the OpenAI client."""
    response = client(url).completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **options
    )
    return response.choices[0].text


def test_models_lists_the_base_and_each_adapter(server):
    ids = [model.id for model in client(server.url).models.list().data]
    assert ids == [MODEL, f"{MODEL}:a", f"{MODEL}:b"]


def test_concurrent_requests_for_different_adapters_share_a_batch_and_match_generate(
    server, folders, tmp_path
):
    # Different prompt lengths (left padding) and budgets (rows leave the batch at different steps).
    cases = [
        ("a", PROMPTS[0], 12),
        ("b", PROMPTS[1], 7),
        (None, PROMPTS[2], 10),
        ("b", PROMPTS[2], 5),
    ]
    engine = server.service.engine
    before = engine.stats.mixed_steps
    with ThreadPoolExecutor(len(cases)) as pool:
        with engine_held(engine, waiting=len(cases)):
            futures = [
                pool.submit(complete, server.url, f"{MODEL}:{a}" if a else MODEL, prompt, n)
                for a, prompt, n in cases
            ]
        served = [future.result() for future in futures]
    assert engine.stats.mixed_steps > before  # they were decoded together
    for (adapter, prompt, n), text in zip(cases, served, strict=True):
        assert text == generated(tmp_path, prompt, n, folders[adapter] if adapter else None)
    assert len(set(served[:3])) == 3


def test_a_request_joins_a_running_batch_and_matches_generate(server, folders, tmp_path):
    engine = server.service.engine
    before = engine.stats.mixed_steps
    with ThreadPoolExecutor(2) as pool:
        with engine_held(engine, waiting=1):
            long = pool.submit(
                complete, server.url, f"{MODEL}:a", PROMPTS[2], 40, extra_body={"ignore_eos": True}
            )
        # The loop admits the long row and decodes a step or two, then waits here again.
        with engine_held(engine, waiting=1):
            late = pool.submit(complete, server.url, f"{MODEL}:b", PROMPTS[0], 6)
        late_text, long_text = late.result(), long.result()
    assert engine.stats.mixed_steps > before  # the late row ran beside the long one
    assert late_text == generated(tmp_path, PROMPTS[0], 6, folders["b"])
    alone = client(server.url).completions.create(
        model=f"{MODEL}:a", prompt=PROMPTS[2], max_tokens=40, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert alone.usage.completion_tokens == 40
    assert long_text == alone.choices[0].text


def test_chat_renders_the_chat_template_like_generate(server, folders, tmp_path):
    response = client(server.url).chat.completions.create(
        model=f"{MODEL}:a", messages=[{"role": "user", "content": "hello there"}],
        max_tokens=8, temperature=0,
    )  # fmt: skip
    expected = generated(tmp_path, "hello there", 8, folders["a"], chat=True)
    assert response.choices[0].message.content == expected
    assert response.choices[0].message.role == "assistant"
    assert response.usage.completion_tokens == 8 or response.choices[0].finish_reason == "stop"


def test_a_chat_adapter_gets_its_template_on_chat_and_raw_text_on_completions(
    server, folders, tmp_path
):
    assert call(server.url, "POST", "/adapters", {"name": "talk", "path": "talk"})[0] == 200
    try:
        cards = {m.id: m for m in client(server.url).models.list().data}
        assert cards[f"{MODEL}:talk"].task == "chat" and cards[f"{MODEL}:a"].task == "causal-lm"
        prompt, model = "hello there", f"{MODEL}:talk"
        chat = client(server.url).chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=8,
            temperature=0,
        )  # fmt: skip
        # `peftkit generate` renders a chat adapter's prompt through the template by itself...
        assert chat.choices[0].message.content == generated(tmp_path, prompt, 8, folders["talk"])
        # ...and /v1/completions sends the text as given, as `generate --task causal-lm` does.
        raw = generated(tmp_path, prompt, 8, folders["talk"], task="causal-lm")
        assert complete(server.url, model, prompt, 8) == raw
        assert raw != chat.choices[0].message.content
    finally:
        call(server.url, "DELETE", "/adapters/talk", None)


def test_streaming_gives_the_same_text_piece_by_piece(server):
    api = client(server.url)
    whole = complete(server.url, f"{MODEL}:b", PROMPTS[1], 10)
    stream = api.completions.create(
        model=f"{MODEL}:b", prompt=PROMPTS[1], max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens <= 10 and not chunks[-1].choices
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    pieces = list(
        api.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=6, temperature=0, stream=True
        )
    )
    assert pieces[0].choices[0].delta.role == "assistant"
    assert (
        "".join(p.choices[0].delta.content or "" for p in pieces) == chat.choices[0].message.content
    )
    assert pieces[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_a_list_of_prompts_gives_one_choice_each(server):
    response = client(server.url).completions.create(
        model=f"{MODEL}:a", prompt=PROMPTS[:2], max_tokens=5, temperature=0
    )
    assert [choice.index for choice in response.choices] == [0, 1]
    alone = [complete(server.url, f"{MODEL}:a", prompt, 5) for prompt in PROMPTS[:2]]
    assert [choice.text for choice in response.choices] == alone


def test_stop_strings_cut_the_text(server):
    whole = complete(server.url, f"{MODEL}:a", PROMPTS[0], 12, extra_body={"ignore_eos": True})
    stop = whole[4:6]
    assert stop and whole.find(stop) >= 0
    response = client(server.url).completions.create(
        model=f"{MODEL}:a", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop],
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert response.choices[0].text == whole[: whole.find(stop)]
    assert response.choices[0].finish_reason == "stop"


def test_a_seed_fixes_sampled_text(server):
    def sampled(seed):
        response = client(server.url).completions.create(
            model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=1.0, top_p=0.9, seed=seed,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        return response.choices[0].text

    assert sampled(7) == sampled(7)
    assert len({sampled(seed) for seed in range(4)}) > 1


def test_adapters_load_and_unload_at_run_time(server, folders, tmp_path):
    url = server.url
    status, body = call(url, "POST", "/adapters", {"name": "c", "path": "c"})
    assert status == 200 and body["id"] == f"{MODEL}:c"
    assert f"{MODEL}:c" in [m.id for m in client(url).models.list().data]
    assert complete(url, f"{MODEL}:c", PROMPTS[1], 8) == generated(
        tmp_path, PROMPTS[1], 8, folders["c"]
    )
    assert call(url, "DELETE", "/adapters/c", None) == (
        200, {"id": f"{MODEL}:c", "object": "model", "deleted": True},
    )  # fmt: skip
    assert f"{MODEL}:c" not in [m.id for m in client(url).models.list().data]
    status, body = call(url, "POST", "/completions", {"model": f"{MODEL}:c", "prompt": "x"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    # The others still serve as before, and the name can be loaded again.
    assert complete(url, f"{MODEL}:a", PROMPTS[1], 8) == generated(
        tmp_path, PROMPTS[1], 8, folders["a"]
    )
    assert call(url, "POST", "/adapters", {"name": "c", "path": "c"})[0] == 200
    assert call(url, "DELETE", "/adapters/c", None)[0] == 200


def test_proxy_tuning_per_request_matches_proxy_generate(server, folders):
    import peftkit.api as api
    from peftkit.decoding.proxy import WithoutAdapter, proxy_generate
    from peftkit.models import load_model

    base, tokenizer = load_model(MODEL, "causal-lm")
    expert = api.load(load_model(MODEL, "causal-lm")[0], folders["c"]).eval()
    expected = proxy_generate(
        base.eval(), expert, WithoutAdapter(expert), tokenizer, [PROMPTS[2]], alpha=0.7,
        max_new_tokens=9,
    )[0]  # fmt: skip
    plain = complete(server.url, MODEL, PROMPTS[2], 9)
    with ThreadPoolExecutor(2) as pool:
        with engine_held(server.service.engine, waiting=2):
            proxied = pool.submit(
                complete, server.url, MODEL, PROMPTS[2], 9, extra_body={"proxy_alpha": 0.7}
            )
            alongside = pool.submit(complete, server.url, MODEL, PROMPTS[2], 9)
        assert proxied.result() == expected
        assert alongside.result() == plain
    assert expected != plain


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_command_line_serves_until_stopped(folders):
    port = free_port()
    command = [sys.executable, "-m", "peftkit.cli", "serve", "--model", MODEL, "--port", str(port),
               "--adapter", f"a={folders['a']}", "--threads", "1"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if call(f"http://127.0.0.1:{port}", "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.2)
        assert [m.id for m in client(url).models.list().data] == [MODEL, f"{MODEL}:a"]
        assert complete(url, f"{MODEL}:a", "hi", 3) == complete(url, f"{MODEL}:a", "hi", 3)
    finally:
        process.terminate()
        process.wait(timeout=30)
