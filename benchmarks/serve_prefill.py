"""Chunked prefill in `peftkit serve`: how long running streams stall while a long prompt is
admitted, for several --max-prefill-tokens budgets (issue 27, item 15).

For each run (BUDGET:MAX_TOKENS) a real server process starts with --max-prefill-tokens BUDGET;
`--streams` streaming requests (greedy, ignore_eos) decode through the openai client; once each
has streamed `--warmup` tokens, one request with a `--prompt-tokens` prompt (token ids) and
max_tokens MAX_TOKENS is sent (1: admitted and answered, as lm-eval's scoring requests; more: it
then decodes next to the streams). Each stream's gaps between chunks are recorded: the median
gap before the long prompt arrived, and the worst gap from its arrival until it was answered.
Goal: worst <= 3x median.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/serve_prefill.py
    .venv/bin/python benchmarks/serve_prefill.py --smoke --output /tmp/prefill.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402
from serve import free_port, start  # noqa: E402


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="base model (tiny-llama: smoke)")
    parser.add_argument("--prompt-tokens", type=int, default=3000, help="the long prompt's length")
    parser.add_argument(
        "--runs", nargs="+", default=["100000:1", "512:1", "64:1", "32:1", "16:1", "16:16"],
        help="BUDGET:MAX_TOKENS: --max-prefill-tokens (100000: the whole prompt in one forward) "
        "and the long request's max_tokens",
    )  # fmt: skip
    parser.add_argument("--vocab", type=int, default=20000, help="the long prompt's ids lie below")
    parser.add_argument("--streams", type=int, default=4, help="streams running meanwhile")
    parser.add_argument("--warmup", type=int, default=20, help="tokens each stream has first")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads of the server")
    parser.add_argument("--output", default="benchmarks/results/serve_prefill.json")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny-llama, a 300-token prompt, two short runs"
    )
    args = parser.parse_args()
    if args.smoke:
        args.model, args.prompt_tokens, args.vocab = "tiny-llama", 300, 250
        args.runs, args.streams, args.warmup = ["100000:1", "16:4"], 2, 5
    return args


def stream(url: str, model: str, arrivals: list[float], stop: threading.Event) -> None:
    """One greedy stream, recording the time each chunk arrives, until `stop` is set."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    events = client.completions.create(
        model=model, prompt="The history of the city begins", max_tokens=3000, temperature=0,
        stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    for _ in events:
        arrivals.append(time.monotonic())
        if stop.is_set():
            break
    events.close()  # the server cancels the row


def one_run(args: argparse.Namespace, budget: int, max_tokens: int) -> dict[str, Any]:
    """Run the scenario against a server with --max-prefill-tokens `budget`, the long request
    asking for `max_tokens`."""
    import openai

    port = free_port()
    command = [
        sys.executable, "-m", "peftkit.cli", "serve", "--model", args.model, "--port", str(port),
        "--threads", str(args.threads), "--max-prefill-tokens", str(budget),
        "--max-model-len", str(args.prompt_tokens + 4000), "--max-tokens", "3500",
    ]  # fmt: skip
    server = start(command, port)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=1200)
        client.completions.create(model=args.model, prompt="warm up", max_tokens=4)
        stop = threading.Event()
        arrivals: list[list[float]] = [[] for _ in range(args.streams)]
        threads = [
            threading.Thread(target=stream, args=(url, args.model, times, stop))
            for times in arrivals
        ]
        for thread in threads:
            thread.start()
        while min(len(times) for times in arrivals) < args.warmup:
            time.sleep(0.01)
        long_prompt = [3 + (i * 7919) % (args.vocab - 3) for i in range(args.prompt_tokens)]
        sent = time.monotonic()
        answer = client.completions.create(
            model=args.model, prompt=long_prompt, max_tokens=max_tokens, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        answered = time.monotonic()
        settle = time.monotonic() + (0.5 if args.smoke else 3)
        while time.monotonic() < settle:
            time.sleep(0.05)
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        server.terminate()
        server.wait(timeout=60)
    before, during = [], []
    for times in arrivals:
        for earlier, later in zip(times, times[1:], strict=False):
            if later <= sent:
                before.append(later - earlier)
            elif earlier <= answered:  # a gap overlapping the long prompt's admission
                during.append(later - earlier)
    median, worst = statistics.median(before), max(during)
    return {
        "max_prefill_tokens": budget,
        "long_max_tokens": max_tokens,
        "long_completion_tokens": answer.usage.completion_tokens,
        "long_prompt_seconds": answered - sent,
        "median_gap_seconds": median,
        "worst_gap_seconds": worst,
        "worst_over_median": worst / median,
        "gaps_before": len(before),
        "gaps_during": len(during),
    }


def main() -> None:
    """Each run in turn; the JSON."""
    args = parse_args()
    results, load = [], [os.getloadavg()]
    for run in args.runs:
        budget, max_tokens = (int(part) for part in run.split(":"))
        result = one_run(args, budget, max_tokens)
        print(json.dumps(result), flush=True)
        results.append(result)
        load.append(os.getloadavg())
    record = {
        "model": args.model, "prompt_tokens": args.prompt_tokens, "streams": args.streams,
        "threads": args.threads, "goal_worst_over_median": 3.0, "machine": machine(),
        "load": "2 cores shared with other jobs; heavy ones take turns under a lock",
        "load_average_1_5_15_min_before_and_after_each_run": load, "results": results,
    }  # fmt: skip
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
