"""The load side of benchmarks/serve.py: requests through the openai client and their latency,
the soak's mix of valid and malformed requests while the server's memory is sampled, and the
baseline server that switches PEFT's active adapter for each request, one request at a time."""

from __future__ import annotations

import itertools
import json
import random
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any


@cache
def client(url: str) -> Any:
    """One openai client per server (thread-safe), no retries: every failure is counted."""
    import openai

    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)


def status(url: str) -> int:
    """The HTTP status of a GET (0 when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def raw(url: str, path: str, body: bytes) -> tuple[int, Any]:
    """POST bytes as they are; (status, JSON body or None)."""
    request = urllib.request.Request(url + path, data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read()
        return error.code, json.loads(text) if text.startswith(b"{") else None


def request_set(
    base: str, texts: list[str], distinct: int, max_tokens: int, model: str | None = None
) -> list[dict[str, Any]]:
    """One greedy request per text, adapter t(i mod distinct) (or all for `model`)."""
    return [
        {
            "model": model or f"{base}:t{i % distinct}",
            "prompt": text,
            "max_tokens": max_tokens,
            "temperature": 0,
            "extra_body": {"ignore_eos": True},
        }
        for i, text in enumerate(texts)
    ]


def complete(url: str, body: dict[str, Any]) -> tuple[float, int]:
    """(seconds, completion tokens) of one request."""
    start = time.perf_counter()
    response = client(url).completions.create(**body)
    return time.perf_counter() - start, response.usage.completion_tokens


def warm_up(url: str, bodies: list[dict[str, Any]], concurrency: int) -> None:
    """A first pass (allocator and caches warm) that is not timed."""
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda body: complete(url, {**body, "max_tokens": 2}), bodies))


def percentile(ordered: list[float], q: float) -> float:
    """The q-th percentile of sorted values, interpolating linearly."""
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def rss_mib(pid: int) -> float:
    """A process's resident memory in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def malformed(base: str, rng: random.Random) -> bytes:
    """One request of the kinds a server must refuse with a 4xx."""
    ok = {"model": base, "prompt": "hello", "max_tokens": 4}
    bodies: list[Any] = [
        b'{"model": "' + base.encode() + b'", "prompt": ',  # cut-off JSON
        {**ok, "model": "no-such-model"},
        {**ok, "model": f"{base}:no-such-adapter"},
        {**ok, "max_tokens": -3},
        {**ok, "max_tokens": "8"},
        {**ok, "temperature": [1]},
        {**ok, "prompt": "word " * 1200},  # past --max-model-len 1024
        {**ok, "prompt": "x" * 70_000},  # past --max-body-bytes 65536
        {**ok, "n": 0},
        {**ok, "prompt": "hi \ud800"},  # a lone surrogate (json.dumps escapes it as \\ud800)
        {**ok, "stop": "s" * 1001},
        {"model": base, "messages": []},
    ]
    body = rng.choice(bodies)
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def valid_request(base: str, adapters: list[str], texts: list[str], rng: random.Random) -> dict:
    """One valid request of a random kind: base or an adapter, greedy or seeded sampling (or the
    hostile-but-valid forms: a temperature too small to divide by, explicit nulls), a stop string,
    chat or completions, streaming or not, now and then a long prompt (chunked prefill)."""
    options: dict[str, Any] = {
        "model": rng.choice([base, *(f"{base}:{name}" for name in adapters)]),
        "max_tokens": rng.randint(1, 8),
        **rng.choice(
            [
                {"temperature": 0},
                {"temperature": 0.8, "top_p": 0.95, "seed": rng.randint(0, 999)},
                {"temperature": 1e-300},  # greedy: too small to divide by
                {"temperature": None, "n": None, "logprobs": None, "seed": rng.randint(0, 999)},
            ]
        ),
        **({"stop": ["."]} if rng.random() < 0.3 else {}),
    }
    if rng.random() < 0.05:  # about 200 tokens (SmolLM2): several chunks at a budget of 64
        text = " ".join(rng.sample(texts, 10))[:900]
    else:
        text = rng.choice(texts)[: rng.randint(20, 200)]
    return {"chat": rng.random() < 0.3, "stream": rng.random() < 0.3, "text": text, **options}


def ask(url: str, request: dict[str, Any]) -> tuple[str, str]:
    """Send a valid_request through the openai client; (its text, its finish reason)."""
    options = {k: v for k, v in request.items() if k not in ("chat", "stream", "text")}
    api, stream = client(url), request["stream"]
    if request["chat"]:
        messages = [{"role": "user", "content": request["text"]}]
        response = api.chat.completions.create(messages=messages, stream=stream, **options)
    else:
        response = api.completions.create(prompt=request["text"], stream=stream, **options)
    chunks = list(response) if stream else [response]
    pieces = []
    for chunk in chunks:
        choice = chunk.choices[0] if chunk.choices else None
        if choice is None:
            continue
        if request["chat"]:
            message = choice.delta if stream else choice.message
            pieces.append(message.content or "")
        else:
            pieces.append(choice.text or "")
    finish = chunks[-1].choices[0].finish_reason
    if finish not in ("stop", "length"):
        raise RuntimeError(f"no finish reason: {chunks[-1]}")
    return "".join(pieces), finish


def abandon(url: str, base: str, rng: random.Random) -> None:
    """A streaming client that leaves after its first chunk (the server cancels its row)."""
    events = client(url).completions.create(
        model=base, prompt="A story that goes on", max_tokens=200, stream=True,
        extra_body={"ignore_eos": True}, seed=rng.randint(0, 999), temperature=0.7,
    )  # fmt: skip
    next(iter(events))
    events.close()


def status_of(error: Exception) -> int | None:
    """The HTTP status an openai error carries (None: no status, e.g. a dropped connection)."""
    return getattr(error, "status_code", None)


def soak(
    url: str, pid: int, base: str, adapters: list[str], seconds: float, concurrency: int
) -> dict[str, Any]:
    """Valid and hostile requests for `seconds`, `concurrency` in flight (about 15% malformed,
    5% streams abandoned after their first chunk); what failed and how the server's memory
    moved; then every valid request again, alone, one at a time: its answer must equal the one
    it got inside the mixed batches."""
    from common import review_texts

    texts, numbers, lock = review_texts(), itertools.count(), threading.Lock()
    counts: Counter = Counter()
    failures: list[str] = []
    answers: list[tuple[dict[str, Any], tuple[str, str]]] = []
    samples: list[tuple[float, float]] = []
    start = time.monotonic()
    end = start + seconds

    def sample_memory() -> None:
        while time.monotonic() < end:
            samples.append((time.monotonic() - start, rss_mib(pid)))
            time.sleep(2)

    def worker() -> None:
        while time.monotonic() < end:
            with lock:
                rng = random.Random(next(numbers))
            draw = rng.random()
            if draw < 0.15:
                got, body = raw(url, "/completions", malformed(base, rng))
                counts[f"malformed {got}"] += 1
                if not (400 <= got < 500 and body and "error" in body):
                    counts["malformed not refused with a 4xx error body"] += 1
                continue
            try:
                if draw < 0.2:
                    abandon(url, base, rng)
                    counts["abandoned stream"] += 1
                    continue
                request = valid_request(base, adapters, texts, rng)
                answer = ask(url, request)
                counts["valid ok"] += 1
                with lock:
                    answers.append((request, answer))
            except Exception as error:  # noqa: BLE001 - counted: the soak's result
                status = status_of(error)
                counts[f"valid failed {status}" if status else "valid failed"] += 1
                failures.append(f"{type(error).__name__}: {str(error)[:200]}")

    sampler = threading.Thread(target=sample_memory)
    sampler.start()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(worker)
    sampler.join()
    soak_seconds = time.monotonic() - start
    mismatches = []
    for request, answer in answers:  # alone: nothing else is in flight now
        alone = ask(url, request)
        if alone != answer:
            mismatches.append({"request": request, "batched": answer, "alone": alone})
    quarter = max(1, len(samples) // 4)
    quarters = [
        statistics.median(m for _, m in samples[i * quarter : (i + 1) * quarter] or samples)
        for i in range(4)
    ]
    five_xx = sum(
        v for k, v in counts.items() if k.split()[-1].isdigit() and int(k.split()[-1]) >= 500
    )
    return {
        "seconds": soak_seconds,
        "requests": sum(counts.values()) - counts["malformed not refused with a 4xx error body"],
        "counts": dict(counts),
        "five_xx": five_xx,
        "valid_failures": failures[:10],
        "answers_checked_alone": len(answers),
        "answers_differing_alone": len(mismatches),
        "differing": mismatches[:10],
        "solo_replay_seconds": time.monotonic() - start - soak_seconds,
        "rss_mib_samples": samples,
        "rss_mib_quarter_medians": quarters,
        "rss_mib_growth_first_to_last_quarter": quarters[-1] - quarters[0],
        "rss_mib_max": max(m for _, m in samples),
    }


def switching_server(model_name: str, folder: Path, port: int) -> None:
    """The baseline: every adapter loaded with PEFT; each request, one at a time, switches the
    active adapter and runs `generate` (what a server without mixed batches does)."""
    import torch
    import uvicorn
    from fastapi import FastAPI

    from peftkit.methods.lora import compose
    from peftkit.models import load_model

    base, tokenizer = load_model(model_name, "causal-lm", seed=0)
    folders = {path.name: path for path in sorted(folder.iterdir())}
    model = compose.load_adapters(base, folders).eval()
    app, lock = FastAPI(), threading.Lock()

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": []}

    @app.post("/v1/completions")
    def completions(body: dict[str, Any]) -> dict[str, Any]:
        tokens = body["max_tokens"]
        inputs = tokenizer(body["prompt"], return_tensors="pt")
        with lock, torch.no_grad():
            compose.set_active(model, body["model"].rpartition(":")[2])
            output = model.generate(
                **inputs,
                max_new_tokens=tokens,
                do_sample=False,
                min_new_tokens=tokens if body.get("ignore_eos") else 0,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = output[0, inputs["input_ids"].shape[1] :]
        prompt = int(inputs["input_ids"].shape[1])
        text = tokenizer.decode(new, skip_special_tokens=True)
        return {
            "id": "cmpl-switching",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": len(new),
                "total_tokens": prompt + len(new),
            },
        }

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
