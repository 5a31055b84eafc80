"""`peftkit serve` under load on localhost: tokens/s and latency with 1, 4 and 16 distinct LoRA
adapters in one continuous batch, against (a) the same server serving one merged model and (b) a
server that switches PEFT's active adapter per request; then, with --soak-seconds, a soak of
mixed valid and hostile requests watching errors and the server's memory, then each valid
request again alone: its answer must equal the one it got in the mixed batches.

Each arm is a real server process (`peftkit serve`, or this script's --switching-server) and the
load generator here sends a fixed set of prompts (review texts) through the openai client, a
fixed number in flight. Every request asks for exactly --max-tokens greedy tokens (ignore_eos;
the switching server sets min_new_tokens), so every arm produces the same number of tokens.
Rounds interleave the arms. Before the servers start, one decode step of a 16-row batch is timed
in this process: the base alone, the server's stacked per-row LoRA, and PEFT's own mixed batch.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/serve.py
    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/serve.py --rounds 0 \\
        --soak-seconds 120 --max-prefill-tokens 64 \\
        --output benchmarks/results/serve_soak.json
    .venv/bin/python benchmarks/serve.py --smoke --rounds 0 --soak-seconds 4 --output /tmp/s.json
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import serve_load  # noqa: E402
from common import machine, median, review_texts  # noqa: E402


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="base model (tiny-llama: smoke)")
    parser.add_argument("--adapters", type=int, default=16, help="LoRA adapters loaded")
    parser.add_argument(
        "--distinct",
        type=int,
        nargs="+",
        default=[1, 4, 16],
        help="distinct adapters the requests use, one measurement each",
    )
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of each adapter")
    parser.add_argument("--requests", type=int, default=64, help="requests per measurement")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (0: none)")
    parser.add_argument("--step-reps", type=int, default=10, help="timed decode steps per arm")
    parser.add_argument("--soak-seconds", type=float, default=0, help="soak length (0: none)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per process")
    parser.add_argument(
        "--max-prefill-tokens", type=int, default=512, help="the servers' chunked-prefill budget"
    )
    parser.add_argument("--output", default="benchmarks/results/serve.json", help="JSON to write")
    parser.add_argument(
        "--switching-server",
        metavar="FOLDER",
        help="internal: run the switching baseline over FOLDER's adapters",
    )
    parser.add_argument("--port", type=int, default=0, help="internal: the baseline's port")
    parser.add_argument(
        "--smoke", action="store_true",
        help="tiny-llama, 2 adapters, a few short requests (the test suite runs this)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.smoke:
        args.model, args.adapters, args.distinct = "tiny-llama", 2, [1, 2]
        args.requests, args.concurrency, args.max_tokens, args.step_reps = 8, 4, 4, 2
    return args


def build_adapters(args: argparse.Namespace, folder: Path) -> dict[str, str]:
    """--adapters random LoRA adapters (B drawn non-zero, as after training), t0 ... tN."""
    import torch

    import peftkit
    from peftkit.models import load_model

    folders = {}
    for index in range(args.adapters):
        base, _ = load_model(args.model, "causal-lm", seed=0)
        torch.manual_seed(index)
        model = peftkit.apply(base, peftkit.LoraConfig(rank=args.rank, dropout=0.0))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.02)
        folders[f"t{index}"] = str(peftkit.save(model, folder / f"t{index}"))
    return folders


def build_merged(args: argparse.Namespace, adapter: str, folder: Path) -> str:
    """The base with adapter t0 folded in, saved as a plain transformers model folder."""
    import peftkit.api as api
    from peftkit.models import load_model

    base, tokenizer = load_model(args.model, "causal-lm", seed=0)
    merged = api.merge(api.load(base, adapter))
    merged.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def decode_step(args: argparse.Namespace, folders: dict[str, str]) -> dict[str, Any]:
    """Seconds of one decode step, 16 rows with 16 distinct adapters, 64 cached tokens each."""
    import torch

    from peftkit.methods.lora import compose
    from peftkit.methods.lora.rows import ROW_ADAPTERS
    from peftkit.models import load_model

    names = list(folders)[:16]
    rows = len(names)
    plain = load_model(args.model, "causal-lm", seed=0)[0].eval()
    stacked = load_model(args.model, "causal-lm", seed=0)[0]
    for name in names:  # the server's path: adapters stacked per layer
        stacked = ROW_ADAPTERS.add(stacked, name, folders[name])
    base = load_model(args.model, "causal-lm", seed=0)[0]  # PEFT's own mixed batches
    peft_rows = compose.load_adapters(base, {name: folders[name] for name in names}).eval()
    vocab = min(plain.config.vocab_size, 1000)
    ids = torch.randint(0, vocab, (rows, 64), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(rows, 65, dtype=torch.long)
    arms = {
        "base": lambda **kw: plain(**kw),
        "stacked": lambda **kw: ROW_ADAPTERS.forward(stacked, names, **kw),
        "peft_mixed": lambda **kw: peft_rows(**kw, adapter_names=names),
    }
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    with torch.no_grad():
        caches = {arm: run(input_ids=ids, use_cache=True).cache for arm, run in arms.items()}
        for _ in range(args.step_reps):
            for arm, run in arms.items():
                cache = copy.deepcopy(caches[arm])  # outside the timing
                start = time.perf_counter()
                run(input_ids=ids[:, :1], attention_mask=mask, cache=cache, use_cache=True)
                seconds[arm].append(time.perf_counter() - start)
    medians = {arm: median(values) for arm, values in seconds.items()}
    return {
        "rows": rows,
        "cached_tokens": 64,
        "median_seconds": medians,
        "all_seconds": seconds,
        "stacked_over_base": medians["stacked"] / medians["base"],
        "peft_mixed_over_base": medians["peft_mixed"] / medians["base"],
    }


def free_port() -> int:
    """A port nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(command: list[str], port: int) -> subprocess.Popen:
    """Start a server process and wait until it answers."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while serve_load.status(f"http://127.0.0.1:{port}/v1/models") != 200:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{command[:5]} did not start: {process.stderr.read()[-2000:]}")
        time.sleep(0.5)
    return process


def serve_command(args: argparse.Namespace, port: int, model: str, extra: list[str]) -> list[str]:
    """A `peftkit serve` command line."""
    return [
        sys.executable,
        "-m",
        "peftkit.cli",
        "serve",
        "--model",
        model,
        "--port",
        str(port),
        "--threads",
        str(args.threads),
        "--max-batch",
        str(args.concurrency),
        "--max-queue",
        "256",
        "--max-model-len",
        "1024",
        "--max-body-bytes",
        "65536",
        "--max-prefill-tokens",
        str(args.max_prefill_tokens),
        *extra,
    ]


def measure(url: str, requests: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """Send the requests, `concurrency` in flight; tokens/s and latency percentiles."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda body: serve_load.complete(url, body), requests))
    seconds = time.perf_counter() - start
    latencies = sorted(latency for latency, _ in results)
    tokens = sum(count for _, count in results)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "p50_seconds": serve_load.percentile(latencies, 50),
        "p99_seconds": serve_load.percentile(latencies, 99),
    }


def throughput(args: argparse.Namespace, folders: dict[str, str], merged: str) -> dict[str, Any]:
    """The three arms' servers, the request sets, interleaved rounds."""
    ports = {arm: free_port() for arm in ("adapters", "merged", "switching")}
    adapters = [flag for name, path in folders.items() for flag in ("--adapter", f"{name}={path}")]
    commands = {
        "adapters": serve_command(args, ports["adapters"], args.model, adapters),
        "merged": serve_command(args, ports["merged"], merged, ["--served-model-name", "merged"]),
        "switching": [
            sys.executable,
            __file__,
            "--switching-server",
            str(Path(merged).parent / "adapters"),
            "--model",
            args.model,
            "--port",
            str(ports["switching"]),
            "--threads",
            str(args.threads),
        ],
    }
    if not args.rounds:  # the soak alone needs only the adapters' server
        commands = {"adapters": commands["adapters"]}
    servers = {arm: start(command, ports[arm]) for arm, command in commands.items()}
    texts = [text[:240] for text in review_texts()[: args.requests]]
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for _ in range(args.rounds):
            for distinct in args.distinct:
                for arm, port in ports.items():  # noqa: B007
                    model = "merged" if arm == "merged" else None
                    bodies = serve_load.request_set(
                        args.model, texts, distinct, args.max_tokens, model
                    )
                    url = f"http://127.0.0.1:{port}/v1"
                    serve_load.warm_up(url, bodies[: args.concurrency], args.concurrency)
                    result = measure(url, bodies, args.concurrency)
                    runs.setdefault(f"{arm}_{distinct}", []).append(result)
                    print(
                        f"{arm:>10} distinct {distinct:>2}: "
                        f"{result['tokens_per_second']:7.1f} tok/s, "
                        f"p50 {result['p50_seconds']:.2f} s, p99 {result['p99_seconds']:.2f} s"
                    )
        soak = None
        if args.soak_seconds:
            soak = serve_load.soak(
                f"http://127.0.0.1:{ports['adapters']}/v1",
                servers["adapters"].pid,
                args.model,
                list(folders),
                args.soak_seconds,
                args.concurrency,
            )
    finally:
        for process in servers.values():
            process.terminate()
            process.wait(timeout=60)
    return {"runs": runs, "soak": soak}


def summary(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per distinct count: each arm's median over rounds, and the two target ratios."""
    table = {}
    for distinct in args.distinct:
        arms = {arm: runs[f"{arm}_{distinct}"] for arm in ("adapters", "merged", "switching")}
        medians = {
            arm: {
                key: statistics.median(r[key] for r in results)
                for key in ("tokens_per_second", "p50_seconds", "p99_seconds")
            }
            for arm, results in arms.items()
        }
        table[distinct] = {
            **medians,
            "over_merged": medians["adapters"]["tokens_per_second"]
            / medians["merged"]["tokens_per_second"],
            "over_switching": medians["adapters"]["tokens_per_second"]
            / medians["switching"]["tokens_per_second"],
        }
    return table


def main() -> None:
    """Build adapters and the merged model, time a decode step, load the servers, report."""
    import torch

    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.switching_server:
        serve_load.switching_server(args.model, Path(args.switching_server), args.port)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folders = build_adapters(args, Path(tmp) / "adapters")
        merged = build_merged(args, folders["t0"], Path(tmp) / "merged")
        step = decode_step(args, folders) if args.rounds else None
        if step:
            print(
                "decode step (ms): "
                + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in step["median_seconds"].items())
            )
        loaded = throughput(args, folders, merged)
    result = {
        "model": args.model,
        "adapters": args.adapters,
        "rank": args.rank,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "threads": args.threads,
        "max_prefill_tokens": args.max_prefill_tokens,
        "machine": machine(),
        "decode_step": step,
        "summary": summary(args, loaded["runs"]) if args.rounds else None,
        **loaded,
    }
    for distinct, row in (result["summary"] or {}).items():
        print(
            f"distinct {distinct:>2}: {row['adapters']['tokens_per_second']:.1f} tok/s = "
            f"{row['over_merged']:.2f}x merged, {row['over_switching']:.2f}x switching"
        )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    random.seed(0)
    main()
