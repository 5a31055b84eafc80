"""The Python half of benchmarks/gpu_check.sh: the paths a CPU cannot prove, each a subcommand
that writes one JSON record (its checks, its numbers, passed or not). The shell script runs each
under a time limit and `merge` joins the records into gpu_check.json.

    cuda-present            exit 0 with CUDA, else 2 with a message saying nothing was run
    fsdp  --json F          under torchrun: FSDP2 over NCCL (peftkit's shard()), full
                            fine-tuning of tiny-llama, fp32 and bf16 policies, against one
                            unsharded model on the global batch; QLoRA with NF4 weights in a
                            float storage dtype, sharded
    nf4   --json F          bitsandbytes NF4 on CUDA: a layer's output against x @ dequant(W).T
    train --json F          `peftkit train` on CUDA: fp32, bf16 autocast, NF4 base + bf16
    serve --json F          `peftkit serve --device cuda`: a completion, against the CPU's
    merge --work D --output F   one JSON of every record, the machine and each check's status

Every number is from tiny models built from configs (no downloads); they prove that the paths
run and compute what the CPU computes, not speed."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STEPS = 5
ROWS = [{"prompt": f"say {'abc'[i % 3]} twice:", "response": f" {'abc'[i % 3]} {'abc'[i % 3]}"}
        for i in range(32)]  # fmt: skip


def write(path: str, record: dict[str, Any]) -> None:
    """One check's record; `passed` is every entry of its `checks`."""
    record["passed"] = all(record.get("checks", {}).values()) and bool(record.get("checks"))
    Path(path).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


def cuda_present() -> int:
    """0 when torch sees a CUDA device; else 2, saying so."""
    import torch

    if torch.cuda.is_available():
        print(f"CUDA: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
        return 0
    print(
        f"gpu_check: torch {torch.__version__} sees no CUDA device "
        f"(torch.cuda.is_available() is False; CUDA build: {torch.version.cuda}). This script "
        "checks the GPU paths only and needs a CUDA machine; nothing was run. The CPU paths are "
        "proved by the test suite.",
        file=sys.stderr,
    )
    return 2


def random_batches(vocab: int, world: int, per_rank: int = 2, length: int = 32) -> Any:
    """Seeded token ids, (steps, global batch, length)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (STEPS, world * per_rank, length), generator=generator)


def train_steps(model: Any, ids: Any, rank: int, world: int, sharded: bool) -> list[float]:
    """STEPS AdamW steps; the global batch's mean loss at each (all-reduced when sharded)."""
    import torch
    import torch.distributed as dist

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    per_rank = ids.shape[1] // world
    losses = []
    for step in range(STEPS):
        batch = ids[step].cuda()
        if sharded:
            batch = batch[rank * per_rank : (rank + 1) * per_rank]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.detach().float().clone()
        if sharded:
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
    return losses


def float_storage_qlora(seed: int = 0) -> Any:
    """tiny-llama with NF4 linear layers and LoRA on q and v, on this process's GPU (shard()
    re-stores the packed weights as bf16, bitsandbytes' quant_storage)."""
    import torch

    import peftkit.api as api
    from peftkit.models import load_model
    from peftkit.registry import get_method

    model, _ = load_model("tiny-llama", "causal-lm", seed=seed, quantize="nf4")
    method = get_method("lora")
    config = method.config_cls(rank=4, dropout=0.0)
    torch.manual_seed(seed)
    return api.apply(model, config).cuda()


def fsdp(args: argparse.Namespace) -> None:
    """Under torchrun: FSDP2 over NCCL against one unsharded model on the global batch."""
    import torch
    import torch.distributed as dist

    from peftkit.models import load_model
    from peftkit.training.sharding import shard

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    record: dict[str, Any] = {"world_size": world, "backend": dist.get_backend()}
    checks: dict[str, bool] = {}
    try:
        fresh = lambda: load_model("tiny-llama", "causal-lm", seed=0)[0].cuda().train()  # noqa: E731
        ids = random_batches(fresh().config.vocab_size, world)
        reference = train_steps(fresh(), ids, rank, world, sharded=False)
        for precision in ("fp32", "bf16"):
            model = fresh()
            shard(model, precision)
            local_elements = sum(
                (p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters()
            )
            total = sum(p.numel() for p in model.parameters())
            torch.cuda.reset_peak_memory_stats()
            losses = train_steps(model, ids, rank, world, sharded=True)
            difference = max(abs(a - b) for a, b in zip(losses, reference, strict=True))
            record[precision] = {
                "losses": losses,
                "reference_losses": reference,
                "max_loss_difference": difference,
                "held_fraction": local_elements / total,
                "peak_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
                "param_dtype_in_forward": "bfloat16" if precision == "bf16" else "float32",
            }
            finite = all(math.isfinite(v) for v in losses)
            bound = 1e-4 if precision == "fp32" else 5e-2  # bf16 rounds the gathered weights
            checks[f"{precision}_losses_match_unsharded"] = finite and difference <= bound
            checks[f"{precision}_holds_1_over_world"] = (
                abs(local_elements / total - 1 / world) < 0.01
            )
        try:  # QLoRA sharded: NF4 weights in a bf16 storage dtype, sharded by FSDP2
            whole = train_steps(float_storage_qlora(), ids, rank, world, sharded=False)
            model = float_storage_qlora()
            shard(model, "bf16")
            losses = train_steps(model, ids, rank, world, sharded=True)
            difference = max(abs(a - b) for a, b in zip(losses, whole, strict=True))
            record["qlora_float_storage"] = {"losses": losses, "unsharded_losses": whole,
                                             "max_loss_difference": difference}  # fmt: skip
            checks["qlora_sharded_matches_unsharded"] = difference <= 5e-2
        except Exception as error:  # noqa: BLE001 - recorded, the other arms stand
            record["qlora_float_storage"] = {"error": f"{type(error).__name__}: {error}"}
            checks["qlora_sharded_matches_unsharded"] = False
    finally:
        dist.destroy_process_group()
    record["checks"] = checks
    if rank == 0:
        write(args.json, record)


def nf4(args: argparse.Namespace) -> None:
    """A bitsandbytes NF4 layer on CUDA computes x @ dequant(W).T, forward and backward."""
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    record: dict[str, Any] = {"bitsandbytes": bnb.__version__}
    checks = {}
    for storage in (torch.uint8, torch.bfloat16):
        name = str(storage).removeprefix("torch.")
        layer = bnb.nn.Linear4bit(256, 128, False, torch.float32, quant_type="nf4",
                                  compress_statistics=True, quant_storage=storage)  # fmt: skip
        layer.weight = bnb.nn.Params4bit(torch.randn(128, 256), requires_grad=False,
                                         quant_type="nf4", quant_storage=storage)  # fmt: skip
        layer = layer.cuda()
        x = torch.randn(4, 256, device="cuda", requires_grad=True)
        y = layer(x)
        y.sum().backward()
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        expected = x.detach() @ weight.float().T
        difference = float((y.detach() - expected).abs().max())
        grad_difference = float((x.grad - weight.float().sum(0)).abs().max())
        record[name] = {"forward_max_difference": difference,
                        "input_grad_max_difference": grad_difference,
                        "stored_dtype": str(layer.weight.dtype)}  # fmt: skip
        checks[f"{name}_forward"] = difference <= 1e-3
        checks[f"{name}_backward"] = grad_difference <= 1e-3
    record["checks"] = checks
    write(args.json, record)


def recipe_file(folder: Path) -> Path:
    """A tiny-llama causal-LM LoRA recipe (the sharding tests' task)."""
    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    recipe = folder / "recipe.yaml"
    recipe.write_text(
        "model: tiny-llama\n"
        f"task: {{type: causal-lm, train_file: {train}, eval_file: {train}, max_length: 32}}\n"
        "method: {name: lora, rank: 4, dropout: 0.0}\n"
        "training: {max_steps: 8, batch_size: 8, learning_rate: 0.02, logging_steps: 1}\n"
        f"output_dir: {folder / 'run'}\n"
    )
    return recipe


def train(args: argparse.Namespace) -> None:
    """`peftkit train` on CUDA: fp32, bf16 autocast, and an NF4 base computing in bf16."""
    arms = {
        "fp32": [],
        "bf16_autocast": ["training.precision=bf16"],
        "nf4_bf16": ["training.precision=bf16", "base.quantize=nf4", "base.dtype=bf16"],
    }
    record: dict[str, Any] = {}
    checks = {}
    with tempfile.TemporaryDirectory() as folder:
        recipe = recipe_file(Path(folder))
        for arm, overrides in arms.items():
            output = Path(folder) / arm
            sets = [item for value in overrides for item in ("--set", value)]
            command = [sys.executable, "-m", "peftkit.cli", "train", str(recipe),
                       "--output-dir", str(output), *sets]  # fmt: skip
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, timeout=240)
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                record[arm] = {"returncode": done.returncode, "stderr": done.stderr[-3000:]}
                checks[f"{arm}_trains"] = False
                continue
            summary = json.loads((output / "summary.json").read_text())
            keep = ("final_train_loss", "metric_before", "metric_after", "peak_memory_mib",
                    "weight_memory_mib", "train_seconds")  # fmt: skip
            record[arm] = {key: summary.get(key) for key in keep} | {"seconds": seconds}
            checks[f"{arm}_trains"] = (
                math.isfinite(summary["final_train_loss"])
                and summary["metric_after"] < summary["metric_before"]
            )
        if "final_train_loss" in record.get("fp32", {}) and "final_train_loss" in record.get(
            "bf16_autocast", {}
        ):
            gap = abs(
                record["fp32"]["final_train_loss"] - record["bf16_autocast"]["final_train_loss"]
            )
            record["bf16_vs_fp32_final_loss_difference"] = gap
            checks["bf16_close_to_fp32"] = gap <= 0.1 * abs(record["fp32"]["final_train_loss"])
    record["checks"] = checks
    write(args.json, record)


def completion(url: str, model: str) -> dict[str, Any]:
    """One greedy completion of 8 tokens from the server at url, with the first logprob."""
    import urllib.request

    body = {"model": model, "prompt": "say a twice:", "max_tokens": 8, "temperature": 0,
            "logprobs": 1}  # fmt: skip
    request = urllib.request.Request(
        f"{url}/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def serve(args: argparse.Namespace) -> None:
    """`peftkit serve` on CUDA and on the CPU: the same greedy completion, the same logprobs."""
    from peftkit.serve.server import ServeOptions, running

    record: dict[str, Any] = {}
    answers = {}
    for device in ("cuda", "cpu"):
        options = ServeOptions(model="tiny-llama", port=0, device=device)
        start = time.perf_counter()
        with running(options) as server:
            answers[device] = completion(server.url, "tiny-llama")
            record[f"{device}_device"] = str(next(server.service.engine.model.parameters()).device)
        record[f"{device}_seconds"] = time.perf_counter() - start
    texts = {device: answer["choices"][0]["text"] for device, answer in answers.items()}
    logprobs = {d: a["choices"][0]["logprobs"]["token_logprobs"] for d, a in answers.items()}
    # over the tokens both chose alike (a near-tie may end one earlier, at its end of text)
    pairs = zip(logprobs["cuda"], logprobs["cpu"], strict=False)
    difference = max(abs(a - b) for a, b in pairs)
    record |= {"texts": texts, "max_logprob_difference": difference}
    record["checks"] = {
        "served_on_cuda": record["cuda_device"].startswith("cuda"),
        "same_text_as_cpu": texts["cuda"] == texts["cpu"],
        "logprobs_match_cpu": difference <= 1e-3,
    }
    write(args.json, record)


def merge(args: argparse.Namespace) -> None:
    """Join every check's record with its exit status and seconds into one JSON."""
    import platform

    import torch

    work = Path(args.work)
    checks: dict[str, Any] = {}
    for line in (work / "status").read_text().splitlines():
        name, code, seconds = line.split()
        path = work / f"{name}.json"
        entry: dict[str, Any] = {"exit_code": int(code), "seconds": int(seconds)}
        if int(code) == 124:
            entry["error"] = "timed out (its limit in gpu_check.sh)"
        if path.is_file():
            entry |= json.loads(path.read_text())
        else:
            entry["passed"] = False
            log = work / f"{name}.log"
            entry["log_tail"] = log.read_text()[-3000:] if log.is_file() else ""
        checks[name] = entry
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    payload = {
        "benchmark": "gpu_check",
        "machine": {
            "gpus": devices,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },  # fmt: skip
        "passed": all(entry.get("passed") for entry in checks.values()),
        "checks": checks,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(payload, indent=2) + "\n")
    for name, entry in checks.items():
        print(
            f"  {name:12s} {'passed' if entry.get('passed') else 'FAILED'} ({entry['seconds']} s)"
        )
    print(f"wrote {args.output}")


def main() -> int:
    """Dispatch one subcommand."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("cuda-present")
    for name in ("fsdp", "nf4", "train", "serve"):
        commands.add_parser(name).add_argument("--json", required=True)
    joined = commands.add_parser("merge")
    joined.add_argument("--work", required=True)
    joined.add_argument("--output", required=True)
    args = parser.parse_args()
    if args.command == "cuda-present":
        return cuda_present()
    handlers = {"fsdp": fsdp, "nf4": nf4, "train": train, "serve": serve, "merge": merge}
    handlers[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
