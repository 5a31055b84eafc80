"""Every bad request gets a 4xx with OpenAI's error body, and the server goes on serving: bad JSON,
wrong types, unknown models and adapters, prompts too long, options out of range, a body too
large, a full queue (429); a request past its time limit fails with a 504; adapter loads outside
the adapter directory, with bad names or twice are refused; so are bad `peftkit serve` flags."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from serve_support import MODEL, call, client, engine_held, is_openai_error, make_adapter

from peftkit.cli import main
from peftkit.errors import ConfigError
from peftkit.serve import server as server_module
from peftkit.serve.server import ServeOptions, running

CONTEXT = 64  # --max-model-len of the test server
OK = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    outside = tmp_path_factory.mktemp("elsewhere")
    make_adapter(root / "a", seed=1, rank=2)
    make_adapter(outside / "x", seed=2, rank=2)
    (root / "escape").symlink_to(outside / "x", target_is_directory=True)
    (root / "loop").symlink_to(root / "loop")  # a symbolic link to itself
    (root / "run_out").mkdir()  # a run folder whose adapter/ links outside
    (root / "run_out" / "adapter").symlink_to(outside / "x", target_is_directory=True)
    make_adapter(root / "file_out", seed=3, rank=2)  # its weights file links outside
    (root / "file_out" / "adapter_model.safetensors").unlink()
    (root / "file_out" / "adapter_model.safetensors").symlink_to(
        outside / "x" / "adapter_model.safetensors"
    )
    (root / "alias").symlink_to(root / "a", target_is_directory=True)  # inside: fine
    return {"root": root, "outside": outside}


@pytest.fixture(scope="module")
def server(folders):
    options = ServeOptions(
        model=MODEL, adapters={"a": str(folders["root"] / "a")}, adapter_dir=str(folders["root"]),
        port=0, max_tokens=16, max_model_len=CONTEXT, max_body_bytes=4096,
    )  # fmt: skip
    with running(options) as served:
        yield served


BAD_REQUESTS = [
    # (what, method, path, body, status, param)
    ("malformed JSON", "POST", "/completions", b'{"model": "tiny-llama", "prompt": ', 400, None),
    ("JSON that is not an object", "POST", "/completions", b"[1, 2]", 400, None),
    ("no body", "POST", "/completions", b"", 400, None),
    ("no model", "POST", "/completions", {"prompt": "x"}, 400, "model"),
    ("unknown model", "POST", "/completions", {**OK, "model": "gpt-4"}, 404, "model"),
    ("unknown adapter", "POST", "/completions", {**OK, "model": f"{MODEL}:zz"}, 404, "model"),
    ("adapter of another base", "POST", "/completions", {**OK, "model": "other:a"}, 404, "model"),
    ("max_tokens as text", "POST", "/completions", {**OK, "max_tokens": "5"}, 400, "max_tokens"),
    ("max_tokens as float", "POST", "/completions", {**OK, "max_tokens": 2.0}, 400, "max_tokens"),
    ("negative max_tokens", "POST", "/completions", {**OK, "max_tokens": -1}, 400, "max_tokens"),
    ("zero max_tokens", "POST", "/completions", {**OK, "max_tokens": 0}, 400, "max_tokens"),
    (
        "max_tokens over the limit",
        "POST",
        "/completions",
        {**OK, "max_tokens": 17},
        400,
        "max_tokens",
    ),
    (
        "temperature as text",
        "POST",
        "/completions",
        {**OK, "temperature": "hot"},
        400,
        "temperature",
    ),
    (
        "temperature too high",
        "POST",
        "/completions",
        {**OK, "temperature": 2.5},
        400,
        "temperature",
    ),
    (
        "NaN temperature",
        "POST",
        "/completions",
        b'{"model": "tiny-llama", "prompt": "x", "temperature": NaN}',
        400,
        "temperature",
    ),
    ("top_p of 0", "POST", "/completions", {**OK, "top_p": 0}, 400, "top_p"),
    ("seed as text", "POST", "/completions", {**OK, "seed": "1"}, 400, "seed"),
    ("stream as 1", "POST", "/completions", {**OK, "stream": 1}, 400, "stream"),
    ("prompt as a number", "POST", "/completions", {**OK, "prompt": 5}, 400, "prompt"),
    ("empty prompt", "POST", "/completions", {**OK, "prompt": ""}, 400, "prompt"),
    ("empty list of token ids", "POST", "/completions", {**OK, "prompt": []}, 400, "prompt"),
    (
        "empty token ids in a batch",
        "POST",
        "/completions",
        {**OK, "prompt": [[1, 2], []]},
        400,
        "prompt",
    ),
    ("seed past 64 bits", "POST", "/completions", {**OK, "seed": 2**64}, 400, "seed"),
    ("token id out of range", "POST", "/completions", {**OK, "prompt": [1, 10**6]}, 400, "prompt"),
    ("prompt too long", "POST", "/completions", {**OK, "prompt": "word " * CONTEXT}, 400, "prompt"),
    (
        "prompt + max_tokens too long",
        "POST",
        "/completions",
        {**OK, "prompt": "ab" * 26, "max_tokens": 16},
        400,
        "prompt",
    ),
    ("five stop strings", "POST", "/completions", {**OK, "stop": list("abcde")}, 400, "stop"),
    ("empty stop string", "POST", "/completions", {**OK, "stop": [""]}, 400, "stop"),
    ("stop string of 1001 characters", "POST", "/completions", {**OK, "stop": "s" * 1001}, 400,
     "stop"),  # fmt: skip
    ("n = 0", "POST", "/completions", {**OK, "n": 0}, 400, "n"),
    ("logprobs above 20", "POST", "/completions", {**OK, "logprobs": 21}, 400, "logprobs"),
    ("echo on a stream", "POST", "/completions", {**OK, "echo": True, "stream": True}, 400, "echo"),
    (
        "top_logprobs without logprobs",
        "POST",
        "/chat/completions",
        {**CHAT, "top_logprobs": 2},
        400,
        "top_logprobs",
    ),
    ("best_of = 2", "POST", "/completions", {**OK, "best_of": 2}, 400, "best_of"),
    (
        "Proxy-Tuning without a pair",
        "POST",
        "/completions",
        {**OK, "proxy_alpha": 1.0},
        400,
        "proxy_alpha",
    ),
    (
        "chat without messages",
        "POST",
        "/chat/completions",
        {**CHAT, "messages": []},
        400,
        "messages",
    ),
    (
        "chat with an unknown role",
        "POST",
        "/chat/completions",
        {**CHAT, "messages": [{"role": "tool", "content": "x"}]},
        400,
        "messages",
    ),
    (
        "chat content as a number",
        "POST",
        "/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": 3}]},
        400,
        "messages",
    ),
    (
        "chat with tools",
        "POST",
        "/chat/completions",
        {**CHAT, "tools": [{"type": "function"}]},
        400,
        "tools",
    ),
    (
        "chat too long",
        "POST",
        "/chat/completions",
        {**CHAT, "messages": [{"role": "user", "content": "w " * CONTEXT}]},
        400,
        "messages",
    ),
    ("body over the size limit", "POST", "/completions", {**OK, "prompt": "x" * 5000}, 413, None),
    ("unknown route", "GET", "/nothing-here", None, 404, None),
    ("wrong method", "GET", "/completions", None, 405, None),
    (
        "adapter path outside the directory",
        "POST",
        "/adapters",
        {"name": "x", "path": "../elsewhere/x"},
        400,
        "path",
    ),
    (
        "adapter path through a symlink out",
        "POST",
        "/adapters",
        {"name": "x", "path": "escape"},
        400,
        "path",
    ),
    (
        "adapter folder that does not exist",
        "POST",
        "/adapters",
        {"name": "x", "path": "nope"},
        400,
        "path",
    ),
    ("adapter name with a slash", "POST", "/adapters", {"name": "a/b", "path": "a"}, 400, "name"),
    ("adapter name with a colon", "POST", "/adapters", {"name": "a:b", "path": "a"}, 400, "name"),
    ("adapter name taken", "POST", "/adapters", {"name": "a", "path": "a"}, 409, None),
    ("adapter name as a number", "POST", "/adapters", {"name": 3, "path": "a"}, 400, "name"),
    ("unloading an unknown adapter", "DELETE", "/adapters/zz", None, 404, None),
    # Malformed input (issue 27, item 9): each a 4xx, never a 500.
    ("lone surrogate in the prompt", "POST", "/completions",
     b'{"model": "tiny-llama", "prompt": "hi \\ud800", "max_tokens": 2}', 400, "prompt"),
    ("lone surrogate in a prompt list", "POST", "/completions",
     b'{"model": "tiny-llama", "prompt": ["ok", "\\udfff"], "max_tokens": 2}', 400, "prompt"),
    ("lone surrogate in the model", "POST", "/completions",
     b'{"model": "tiny-llama\\ud800", "prompt": "hi"}', 400, "model"),
    ("lone surrogate in a chat message", "POST", "/chat/completions",
     b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "\\ud83d"}]}', 400,
     "messages"),
    ("lone surrogate in a stop string", "POST", "/completions",
     b'{"model": "tiny-llama", "prompt": "hi", "stop": ["\\ud800"]}', 400, "stop"),
    ("lone surrogate in an adapter path", "POST", "/adapters",
     b'{"name": "x", "path": "a\\ud800"}', 400, "path"),
    ("NUL byte in an adapter path", "POST", "/adapters", {"name": "x", "path": "a\x00b"}, 400,
     "path"),
    ("adapter path through a symlink loop", "POST", "/adapters", {"name": "x", "path": "loop"},
     400, "path"),
    ("adapter path with a 3000-character name", "POST", "/adapters",
     {"name": "x", "path": "p" * 3000}, 400, "path"),
    ("adapter path with a 300-character component", "POST", "/adapters",
     {"name": "x", "path": "p" * 300}, 400, "path"),
    ("a 3000-character adapter name", "POST", "/adapters", {"name": "n" * 3000, "path": "a"}, 400,
     "name"),
    ("a 3000-character model", "POST", "/completions", {**OK, "model": "m" * 3000}, 404, "model"),
    ("unloading a 3000-character name", "DELETE", "/adapters/" + "n" * 3000, None, 404, None),
    ("null model", "POST", "/completions", {**OK, "model": None}, 400, "model"),
    ("null prompt", "POST", "/completions", {**OK, "prompt": None}, 400, "prompt"),
    # Symbolic links under --adapter-dir (item 6): the run's adapter/ or a file linking out.
    ("run folder whose adapter/ links outside", "POST", "/adapters",
     {"name": "x", "path": "run_out"}, 400, "path"),
    ("adapter file linking outside", "POST", "/adapters", {"name": "x", "path": "file_out"}, 400,
     "path"),
]  # fmt: skip


@pytest.mark.parametrize(
    "what, method, path, body, status, param", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS]
)
def test_a_bad_request_gets_a_4xx_error_body_and_the_server_goes_on(
    server, what, method, path, body, status, param
):
    got, answer = call(server.url, method, path, body)
    assert got == status, answer
    assert is_openai_error(answer), answer
    assert answer["error"]["param"] == param, answer
    ok, served = call(server.url, "POST", "/completions", OK)
    assert ok == 200 and served["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_full_queue_answers_429_and_the_queued_requests_still_complete(folders):
    options = ServeOptions(model=MODEL, port=0, max_queue=2, max_batch=1)
    with running(options) as served, ThreadPoolExecutor(2) as pool:
        with engine_held(served.service.engine, waiting=2):
            queued = [pool.submit(call, served.url, "POST", "/completions", OK) for _ in range(2)]
            while len(served.service.engine.waiting) < 2:
                threading.Event().wait(0.005)
            status, body = call(served.url, "POST", "/completions", OK)
            assert status == 429 and body["error"]["code"] == "queue_full"
            assert is_openai_error(body)
        assert [future.result()[0] for future in queued] == [200, 200]


def test_a_prompt_list_longer_than_the_queue_is_a_400_that_says_so():
    import openai

    options = ServeOptions(model=MODEL, port=0, max_queue=2, max_batch=1)
    with running(options) as served:
        with pytest.raises(openai.BadRequestError, match="3 prompts, more than this server queues"):
            client(served.url).completions.create(model=MODEL, prompt=["a", "b", "c"], max_tokens=1)
        response = client(served.url).completions.create(
            model=MODEL, prompt=["a", "b"], max_tokens=1
        )
        assert len(response.choices) == 2


def test_explicit_nulls_mean_the_defaults(server):
    api = client(server.url)
    plain = api.completions.create(model=MODEL, prompt="hello", max_tokens=4, seed=5)
    nulls = api.completions.create(
        model=MODEL, prompt="hello", max_tokens=4, seed=5, temperature=None, top_p=None, n=None,
        stream=None, logprobs=None, echo=None, best_of=None, stop=None, suffix=None, user=None,
        presence_penalty=None, frequency_penalty=None, logit_bias=None, stream_options=None,
        extra_body={"ignore_eos": None, "proxy_alpha": None},
    )  # fmt: skip
    assert nulls.choices[0].text == plain.choices[0].text
    messages = [{"role": "user", "content": "hi"}]
    chat = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, seed=5)
    chat_nulls = api.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, seed=5, temperature=None, n=None,
        stream=None, logprobs=None, top_logprobs=None, max_completion_tokens=None, tools=None,
        tool_choice=None, response_format=None, stop=None,
    )  # fmt: skip
    assert chat_nulls.choices[0].message.content == chat.choices[0].message.content


@pytest.mark.parametrize("path", ["escape", "run_out", "file_out"])
def test_symbolic_links_out_of_the_adapter_directory_are_refused(server, path):
    status, body = call(server.url, "POST", "/adapters", {"name": "x", "path": path})
    assert status == 400 and body["error"]["code"] == "path_outside_adapter_dir", body


def test_a_symbolic_link_inside_the_adapter_directory_loads(server):
    assert call(server.url, "POST", "/adapters", {"name": "alias", "path": "alias"})[0] == 200
    assert call(server.url, "DELETE", "/adapters/alias", None)[0] == 200


def test_a_request_past_the_time_limit_fails_with_504_and_the_next_one_is_served():
    import openai

    options = ServeOptions(model=MODEL, port=0, timeout=0.5)
    with running(options) as served, ThreadPoolExecutor(1) as pool:
        release = threading.Event()
        served.service.engine.call(release.wait)  # the loop stalls past the time limit
        late = pool.submit(call, served.url, "POST", "/completions", OK)
        threading.Event().wait(1.0)
        release.set()
        status, body = late.result()
        assert status == 504 and body["error"]["type"] == "timeout_error"
        served.service.engine.call(lambda: threading.Event().wait(1.0))
        streamed = client(served.url).completions.create(
            model=MODEL, prompt="hello", max_tokens=2, stream=True
        )
        with pytest.raises(openai.APIError, match="time limit"):
            list(streamed)
        assert call(served.url, "POST", "/completions", OK)[0] == 200


def test_run_time_loading_is_off_without_an_adapter_directory(folders):
    with running(ServeOptions(model=MODEL, port=0)) as served:
        status, body = call(served.url, "POST", "/adapters", {"name": "a", "path": "a"})
        assert status == 403 and body["error"]["code"] == "adapter_loading_disabled"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_batch": 0}, "--max-batch must be above 0"),
        ({"proxy_expert": MODEL}, "needs both --proxy-expert"),
        ({"proxy_expert_adapter": "runs/x"}, "--expert-adapter goes on the expert"),
        (
            {"proxy_adapter": "runs/x", "proxy_expert": MODEL, "proxy_anti_expert": MODEL},
            "either --proxy-adapter .* not both",
        ),
        (
            {"adapters": {"a": "/nonexistent"}},
            r"--adapter a=/nonexistent: .* holds no adapter_config",
        ),
    ],
)
def test_bad_server_options_are_refused_with_a_clear_message(options, message):
    with pytest.raises(ConfigError, match=message):
        with running(ServeOptions(model=MODEL, port=0, **options)):
            pass


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--adapter", "runs/x"], "--adapter takes NAME=PATH"),
        (["--adapter", "a=runs/x", "--adapter", "a=runs/y"], "names 'a' twice"),
        (["--max-queue", "0"], "--max-queue must be above 0"),
        (["--threads", "0"], "--threads must be at least 1"),
    ],
)
def test_bad_serve_flags_are_refused_before_the_model_loads(flags, message, capsys, monkeypatch):
    def no_load(options):  # reaching the model load would mean the flags were let through
        raise AssertionError("the server started")

    monkeypatch.setattr(server_module, "build", no_load)
    assert main(["serve", "--model", MODEL, *flags]) == 2
    assert message in capsys.readouterr().err
