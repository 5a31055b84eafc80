"""Shared helpers for the benchmark scripts: flags, real text, timing, tables and JSON.

Every benchmark measures speed as a ratio against a baseline run in the same process, with the
arms interleaved round by round, so a noisy shared machine slows both sides alike."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the machines are offline: fail fast, never retry

RESULTS = Path(__file__).parent / "results"


def base_parser(description: str, default_model: str) -> argparse.ArgumentParser:
    """A parser with the flags every benchmark takes: model, threads, output."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--model", default=default_model, help="bundled name (tiny-llama etc. for a smoke run)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="seed for data order and weights")
    parser.add_argument("--output", default=None, help="JSON to write (default: results/<name>)")
    add_smoke_flag(parser)
    return parser


def add_smoke_flag(parser: argparse.ArgumentParser) -> None:
    """--smoke: the script's tiny preset (what tests/test_benchmarks_smoke.py runs)."""
    parser.add_argument(
        "--smoke", action="store_true",
        help="a tiny preset (tiny model from a config, 1-2 steps; JSON to a temp path) to check "
        "the script still runs; its numbers mean nothing",
    )  # fmt: skip


def parse_with_smoke(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, **smoke: Any
) -> argparse.Namespace:
    """Parse the flags; with --smoke, the script's tiny preset replaces them (`smoke` names the
    values) and the JSON goes to a temporary folder unless --output names one."""
    args = parser.parse_args(argv)
    if getattr(args, "smoke", False):
        for key, value in smoke.items():
            if not hasattr(args, key):  # a preset naming a flag the script does not have
                raise SystemExit(f"--smoke preset names {key!r}, which is not a flag here")
            setattr(args, key, value)
        if hasattr(args, "output") and args.output == parser.get_default("output"):
            name = Path(sys.argv[0]).stem or "benchmark"
            args.output = str(Path(tempfile.mkdtemp(prefix="peftkit-smoke-")) / f"{name}.json")
    return args


# The flags of a timed training step, by the names the scripts spell them (and their JSON
# settings keep): rows per batch, tokens per row, interleaved rounds, timed steps.
STEP_FLAGS = {
    "batch": "rows per batch",
    "batch_size": "rows per batch",
    "seq": "tokens per row",
    "seq_len": "tokens per row",
    "rounds": "interleaved rounds",
    "steps": "timed steps per arm per round",
}


def add_step_flags(parser: argparse.ArgumentParser, **defaults: int) -> None:
    """The step flags named (STEP_FLAGS: batch or batch_size, seq or seq_len, rounds, steps)
    with their defaults, in the order given (the order of the JSON settings)."""
    for name, default in defaults.items():
        if name not in STEP_FLAGS:
            raise ValueError(f"{name!r} is not a step flag (known: {', '.join(STEP_FLAGS)})")
        flag = f"--{name.replace('_', '-')}"
        parser.add_argument(flag, type=int, default=default, help=STEP_FLAGS[name])


def setup(args: argparse.Namespace) -> None:
    """Threads and seeds, before anything is built."""
    import torch
    from transformers import set_seed

    torch.set_num_threads(args.threads)
    set_seed(args.seed)


def review_texts(split: str = "train") -> list[str]:
    """The Amazon Fine Foods review texts (real, variable-length English)."""
    from peftkit.data.bundled import amazon_reviews

    train, test = amazon_reviews()
    return [str(row["text"]) for row in (train if split == "train" else test)]


def packed_lm_features(tokenizer: Any, count: int, seq_len: int) -> list[dict[str, list[int]]]:
    """`count` causal-LM features of exactly `seq_len` tokens cut from the concatenated reviews,
    so every batch has the same shape (timing then depends on the code, not on the lengths)."""
    stream: list[int] = []
    for text in review_texts():
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        stream.append(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        if len(stream) >= count * seq_len:
            break
    if len(stream) < count * seq_len:
        stream = (stream * (count * seq_len // max(1, len(stream)) + 1))[: count * seq_len]
    chunks = [stream[i * seq_len : (i + 1) * seq_len] for i in range(count)]
    return [{"input_ids": c, "attention_mask": [1] * seq_len, "labels": c} for c in chunks]


def batches_of(tokenizer: Any, batch: int, seq: int, count: int) -> list[dict[str, Any]]:
    """`count` batches of `batch` rows of exactly `seq` tokens (packed_lm_features, as tensors)."""
    import torch

    features = packed_lm_features(tokenizer, batch * count, seq)
    return [
        {
            key: torch.tensor([f[key] for f in features[i * batch : (i + 1) * batch]])
            for key in features[0]
        }
        for i in range(count)
    ]


def interleaved(arms: dict[str, Callable[[], list[float]]], rounds: int) -> dict[str, list[float]]:
    """Run each arm once per round, in rotating order; every arm returns per-step seconds."""
    names = list(arms)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        order = names[index % len(names) :] + names[: index % len(names)]
        for name in order:
            seconds[name] += arms[name]()
    return seconds


def median(values: Sequence[float]) -> float:
    """The median, robust to the odd slow step a shared machine adds."""
    return float(statistics.median(values))


def clock() -> float:
    """A monotonic wall clock in seconds."""
    return time.perf_counter()


def adamw_step(model: Any, batches: list[dict]) -> Any:
    """A function taking one AdamW step (lr 1e-5, fused) over the model's trainable parameters
    on the next batch, cycling through them; it returns the loss."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    model.train()
    position = [0]

    def step() -> float:
        batch = batches[position[0] % len(batches)]
        position[0] += 1
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def timed(step: Any, count: int) -> Any:
    """A function timing `count` calls of step."""

    def run() -> list[float]:
        seconds = []
        for _ in range(count):
            start = clock()
            step()
            seconds.append(clock() - start)
        return seconds

    return run


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table with aligned columns (peftkit's own writer; cells as text)."""
    from peftkit.tables import markdown_table as write

    return write([str(c) for c in header], [[str(c) for c in row] for row in rows])


def machine() -> dict[str, Any]:
    """What the numbers were measured on and how busy it was: CPU model and the instruction-set
    flags torch's kernels pick by, cores and torch threads, the torch build, and the 1/5/15-minute
    load average at writing (a load above the cores means other jobs shared the machine)."""
    import torch

    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), "x86_64"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    cores = os.cpu_count() or 1
    record = {
        "processor": platform.processor() or platform.machine(),
        "cpu_model": model,
        "cpu_count": cores,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "load_average": load,
        "load_above_cores": bool(load and load[0] > cores),  # other jobs shared the cores
    }
    if torch.cuda.is_available():
        record["gpu"] = torch.cuda.get_device_name(0)
    return record


def write_json(name: str, args: argparse.Namespace, results: Any, output: str | None) -> Path:
    """results/<name>.json: the settings, the machine and the results."""
    path = Path(output) if output else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "output"}
    payload = {"benchmark": name, "settings": settings, "machine": machine(), "results": results}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


class StepTimer:
    """A transformers TrainerCallback recording wall time between optimizer steps: the interval
    from one step's end to the next covers data loading, forward, backward, clipping, the
    optimizer, the scheduler, callbacks and logging: everything the training loop does."""

    def __init__(self, count: Callable[[], int] | None = None) -> None:
        self.last: float | None = None
        self.seconds: list[float] = []
        self.count = count  # e.g. a collator's running token count, read at each step's end
        self.counts: list[int] = []

    def callback(self) -> Any:
        """The callback object to hand to the Trainer."""
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
                timer.last = clock()

            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
                now = clock()
                timer.seconds.append(now - timer.last)
                timer.last = now
                if timer.count is not None:
                    timer.counts.append(timer.count())

        return _Callback()
