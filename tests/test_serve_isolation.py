"""No request harms another (issue 27, items 1 to 3), through the real OpenAI client: a tiny
positive temperature decodes greedily; a row whose sampling fails fails alone while the rows
decoded beside it get their solo answers; an adapter that fails to load, or whose init would
rewrite the base (PiSSA in any of PEFT's spellings, OLoRA, CorDA, LoftQ, LoRA-GA), leaves the
server answering exactly as before."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from safetensors.torch import load_file, save_file
from serve_support import MODEL, call, client, engine_held, make_adapter

from peftkit.serve import engine as engine_module
from peftkit.serve.server import ServeOptions, running

PROMPTS = ["the cat sat on", "a dog", "parameter efficient fine tuning is"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(root / "a", seed=1, rank=2)
    make_adapter(root / "good", seed=3, rank=2)
    # A shape mismatch: the saved A of one layer has one row too many for the config's rank.
    make_adapter(root / "misfit", seed=4, rank=2)
    weights = load_file(root / "misfit" / "adapter_model.safetensors")
    key = next(k for k in sorted(weights) if "lora_A" in k)
    weights[key] = torch.randn(weights[key].shape[0] + 1, weights[key].shape[1])
    save_file(weights, root / "misfit" / "adapter_model.safetensors")
    # The same mismatch saved with init_lora_weights false (PEFT's "leave the factors as built").
    make_adapter(root / "misfit_noinit", seed=5, rank=2)
    save_file(weights, root / "misfit_noinit" / "adapter_model.safetensors")
    set_init(root / "misfit_noinit", False)
    for init in ("pissa_niter_2", "pissa", "olora", "corda", "loftq", "lora_ga"):
        make_adapter(root / init, seed=6, rank=2)
        set_init(root / init, init)
    return root


def set_init(folder, init) -> None:
    """Rewrite an adapter's saved init_lora_weights."""
    path = folder / "adapter_config.json"
    saved = json.loads(path.read_text())
    saved["init_lora_weights"] = init
    path.write_text(json.dumps(saved))


def complete(url, model, prompt, max_tokens=8, **options):
    """One completion's text through the OpenAI client (greedy unless told)."""
    options.setdefault("temperature", 0)
    response = client(url).completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, **options
    )
    return response.choices[0].text


def answers(url, models):
    """Greedy answers of every model to every prompt: what 'the server as it was' means here."""
    return {(m, p): complete(url, m, p, extra_body={"ignore_eos": True}) for m in models
            for p in PROMPTS}  # fmt: skip


def test_a_tiny_positive_temperature_decodes_greedily_beside_other_rows(folders):
    options = ServeOptions(model=MODEL, adapters={"a": str(folders / "a")}, port=0)
    with running(options) as served:
        url, engine = served.url, served.service.engine
        greedy = complete(url, f"{MODEL}:a", PROMPTS[0], extra_body={"ignore_eos": True})
        cases = [1e-37, 1e-300, 5e-324, 0.0, 1e-6]
        with ThreadPoolExecutor(len(cases) + 1) as pool:
            with engine_held(engine, waiting=len(cases) + 1):
                tiny = [
                    pool.submit(
                        complete,
                        url,
                        f"{MODEL}:a",
                        PROMPTS[0],
                        temperature=t,
                        extra_body={"ignore_eos": True},
                    )  # fmt: skip
                    for t in cases
                ]
                sampled = pool.submit(complete, url, MODEL, PROMPTS[1], temperature=1.0, seed=3)
            assert [future.result() for future in tiny] == [greedy] * len(cases)
            assert sampled.result() == complete(url, MODEL, PROMPTS[1], temperature=1.0, seed=3)


def test_a_row_whose_sampling_fails_fails_alone(folders, monkeypatch):
    real = engine_module.next_token
    calls = {"n": 0, "fail_at": 1}

    def failing_for_seed_666(logits, sampling, generator):
        if sampling.seed == 666:
            calls["n"] += 1
            if calls["n"] == calls["fail_at"]:
                raise RuntimeError("this row's sampler broke")
        return real(logits, sampling, generator)

    options = ServeOptions(model=MODEL, adapters={"a": str(folders / "a")}, port=0)
    with running(options) as served:
        url, engine = served.url, served.service.engine
        solo = [complete(url, f"{MODEL}:a", p, extra_body={"ignore_eos": True}) for p in PROMPTS]
        monkeypatch.setattr(engine_module, "next_token", failing_for_seed_666)
        # Its first token (in the admission forward), then its fourth (a decode step).
        for fail_at in (1, 4):
            calls.update(n=0, fail_at=fail_at)
            with ThreadPoolExecutor(4) as pool:
                with engine_held(engine, waiting=4):
                    good = [
                        pool.submit(complete, url, f"{MODEL}:a", p, extra_body={"ignore_eos": True})
                        for p in PROMPTS
                    ]
                    bad = pool.submit(
                        complete, url, MODEL, "x", temperature=1, seed=666,
                        extra_body={"ignore_eos": True},
                    )  # fmt: skip
                with pytest.raises(openai.InternalServerError, match="sampler broke"):
                    bad.result()
                assert [future.result() for future in good] == solo
            assert calls["n"] == fail_at  # it failed there, and took no further token


def test_a_failed_load_leaves_the_server_exactly_as_it_was(folders):
    # On a server with no adapter yet (the load would wrap the bare base), then with one.
    for start in ({}, {"a": str(folders / "a")}):
        options = ServeOptions(model=MODEL, adapters=start, adapter_dir=str(folders), port=0)
        with running(options) as served:
            url = served.url
            models = [MODEL, *(f"{MODEL}:{name}" for name in start)]
            before = answers(url, models)
            for name in ("misfit", "misfit_noinit"):
                status, body = call(url, "POST", "/adapters", {"name": name, "path": name})
                assert status == 400 and "does not fit" in body["error"]["message"], body
                assert [m.id for m in client(url).models.list().data] == models
                assert answers(url, models) == before
            # And the server still loads a good adapter afterwards, which changes the text.
            assert call(url, "POST", "/adapters", {"name": "good", "path": "good"})[0] == 200
            assert answers(url, models) == before
            assert complete(url, f"{MODEL}:good", PROMPTS[0]) != before[(MODEL, PROMPTS[0])]


@pytest.mark.parametrize("init", ["pissa_niter_2", "pissa", "olora", "corda", "loftq", "lora_ga"])
def test_a_base_changing_adapter_is_refused_before_it_touches_the_base(folders, init):
    options = ServeOptions(
        model=MODEL, adapters={"a": str(folders / "a")}, adapter_dir=str(folders), port=0
    )
    with running(options) as served:
        models = [MODEL, f"{MODEL}:a"]
        before = answers(served.url, models)
        status, body = call(served.url, "POST", "/adapters", {"name": "x", "path": init})
        assert status == 400 and body["error"]["param"] == "path", body
        assert "rewrote" in body["error"]["message"] and init in body["error"]["message"]
        assert answers(served.url, models) == before


def test_a_base_changing_adapter_named_at_start_is_refused(folders):
    from peftkit.errors import ConfigError

    options = ServeOptions(model=MODEL, adapters={"p": str(folders / "pissa_niter_2")}, port=0)
    with pytest.raises(ConfigError, match="pissa_niter_2"):
        with running(options):
            pass


def test_a_request_whose_client_left_is_cancelled_not_decoded(folders):
    options = ServeOptions(model=MODEL, port=0, max_tokens=256)
    with running(options) as served:
        url, engine = served.url, served.service.engine
        impatient = openai.OpenAI(base_url=url, api_key="unused", max_retries=2, timeout=0.5)
        release = threading.Event()
        engine.call(release.wait)  # the engine is busy: the client gives up and retries twice
        before = engine.stats.tokens
        try:
            with pytest.raises(openai.APITimeoutError):
                impatient.completions.create(
                    model=MODEL, prompt="hello", max_tokens=200, temperature=0,
                    extra_body={"ignore_eos": True},
                )  # fmt: skip
            queued = list(engine.waiting)
            assert len(queued) == 3  # the first try and the two retries
            deadline = time.monotonic() + 10
            while not all(row.cancelled for row in queued):
                assert time.monotonic() < deadline, "the rows were not cancelled"
                time.sleep(0.01)
        finally:
            release.set()
        assert complete(url, MODEL, "hello", max_tokens=3) is not None
        # The three abandoned rows produced nothing; only the last request's 3 tokens were made
        # (the count is taken just after the tokens are sent: wait for it).
        deadline = time.monotonic() + 10
        while engine.stats.tokens < before + 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats.tokens == before + 3
        assert all(row.generated == 0 for row in queued)


def test_health_answers_while_a_long_prompt_is_tokenised():
    options = ServeOptions(model=MODEL, port=0, max_body_bytes=3_000_000)
    with running(options) as served:
        root = served.url.removesuffix("/v1")
        text = ("the quick brown fox jumps over the lazy dog " * 25_000)[:1_000_000]
        finished, took = threading.Event(), {}

        def long_prompt():
            started = time.monotonic()
            took["status"] = call(
                served.url, "POST", "/completions", {"model": MODEL, "prompt": text}
            )[0]
            took["seconds"] = time.monotonic() - started
            finished.set()

        threading.Thread(target=long_prompt).start()
        gaps = []
        while not finished.is_set():
            started = time.monotonic()
            assert call(root, "GET", "/health")[0] == 200
            gaps.append(time.monotonic() - started)
            time.sleep(0.02)
        assert took["status"] == 400  # about 200,000 tokens: past the context, once tokenised
        # Tokenising on the event loop held every health check for the whole of it (1.6 s here).
        assert len(gaps) >= 3 and max(gaps) < took["seconds"] / 3, (gaps, took)
