"""Chunked prefill in `peftkit serve`: how long running streams stall while a long prompt is
admitted, for several --max-prefill-tokens budgets (issue 27, item 15).

For each budget a real server process starts; `--streams` streaming requests (greedy,
ignore_eos) decode through the openai client; once each has streamed `--warmup` tokens, one
request with a `--prompt-tokens` prompt (token ids) and max_tokens 1 is sent. Each stream's gaps
between chunks are recorded: the median gap before the long prompt arrived, and the worst gap
from its arrival until it was answered. Goal: worst <= 3x median.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/serve_prefill.py
    .venv/bin/python benchmarks/serve_prefill.py --model tiny-llama --prompt-tokens 300 \\
        --vocab 250 --budgets 100000 32 --output /tmp/prefill.json   # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from serve import free_port, start  # noqa: E402


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="base model (tiny-llama: smoke)")
    parser.add_argument("--prompt-tokens", type=int, default=3000, help="the long prompt's length")
    parser.add_argument(
        "--budgets", type=int, nargs="+", default=[100_000, 512, 256, 128],
        help="--max-prefill-tokens values (100000: the whole prompt in one forward)",
    )  # fmt: skip
    parser.add_argument("--vocab", type=int, default=20000, help="the long prompt's ids lie below")
    parser.add_argument("--streams", type=int, default=4, help="streams running meanwhile")
    parser.add_argument("--warmup", type=int, default=20, help="tokens each stream has first")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads of the server")
    parser.add_argument("--output", default="benchmarks/results/serve_prefill.json")
    return parser.parse_args()


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


def one_budget(args: argparse.Namespace, budget: int) -> dict[str, Any]:
    """Run the scenario against a server with --max-prefill-tokens `budget`."""
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
        client.completions.create(model=args.model, prompt=long_prompt, max_tokens=1)
        answered = time.monotonic()
        settle = time.monotonic() + 3
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
        "long_prompt_seconds": answered - sent,
        "median_gap_seconds": median,
        "worst_gap_seconds": worst,
        "worst_over_median": worst / median,
        "gaps_before": len(before),
        "gaps_during": len(during),
    }


def main() -> None:
    """Each budget in turn; the JSON."""
    args = parse_args()
    results = []
    for budget in args.budgets:
        result = one_budget(args, budget)
        print(json.dumps(result), flush=True)
        results.append(result)
    record = {
        "model": args.model, "prompt_tokens": args.prompt_tokens, "streams": args.streams,
        "threads": args.threads, "goal_worst_over_median": 3.0, "results": results,
    }  # fmt: skip
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
