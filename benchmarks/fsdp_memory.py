"""Full fine-tuning on 2 CPU processes (gloo): per-process tensor memory of FSDP2 against DDP, and
the losses of both against one process at the same global batch.

Three arms on the same seeded model and data: one process of batch 2B; DDP on 2 processes of
batch B; FSDP2 on 2 processes of batch B, sharded as `training.sharding: fsdp` shards it
(peftkit.training.sharding.shard: each decoder layer, then the root). fp32, AdamW, every
sequence of the same length (so the mean of the two processes' token means is the global one).
Per process, after the first optimizer step: the bytes of the parameters, gradients and AdamW
state it holds (a DTensor's local shard). Losses: the global batch's loss at each step.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/fsdp_memory.py      # SmolLM2-135M
    .venv/bin/python benchmarks/fsdp_memory.py --smoke --output /tmp/x.json         # tiny-llama
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from common import base_parser, parse_with_smoke, write_json

WORLD = 2


def parse_args() -> Any:
    """Command-line flags."""
    parser = base_parser(__doc__.split("\n\n")[0], "smollm2-135m")
    parser.add_argument("--steps", type=int, default=10, help="AdamW steps")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per process")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens a sequence")
    return parse_with_smoke(parser, model="tiny-llama", steps=3)


def batches(args: Any, vocab: int) -> Any:
    """Seeded random token ids, (steps, global batch, seq_len), labels the ids themselves."""
    import torch

    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.steps, WORLD * args.batch_size, args.seq_len)
    return torch.randint(3, vocab, shape, generator=generator)


def local_bytes(tensors: Any) -> int:
    """Bytes of the tensors this process holds (a DTensor's local shard)."""
    total = 0
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total


def train(args: Any, arm: str, rank: int) -> dict[str, Any]:
    """One arm on this process: the losses of the global batch, and the memory it holds."""
    import torch
    import torch.distributed as dist

    from peftkit.models import load_model
    from peftkit.training.sharding import shard

    torch.set_num_threads(1)
    model, _ = load_model(args.model, "causal-lm", seed=args.seed)
    model.train()
    ids = batches(args, model.config.vocab_size)
    wrapped: Any = model
    if arm == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    elif arm == "fsdp":
        shard(model, "fp32")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    losses, memory = [], {}
    for step in range(args.steps):
        batch = ids[step]
        if arm != "single":
            batch = batch[rank * args.batch_size : (rank + 1) * args.batch_size]
        loss = wrapped(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        if step == 0:
            state = [v for s in optimizer.state.values() for v in s.values() if v.dim() > 0]
            memory = {
                "parameters": local_bytes(model.parameters()),
                "gradients": local_bytes(p.grad for p in model.parameters() if p.grad is not None),
                "optimizer": local_bytes(state),
            }
            memory["total"] = sum(memory.values())
        optimizer.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if arm != "single":
            dist.all_reduce(value)
            value /= WORLD
        losses.append(float(value))
    return {"losses": losses, "memory": memory}


def worker(rank: int, args: Any, arm: str, port: int, folder: str) -> None:
    """One process of a 2-process arm: join the gloo group, train, write its result."""
    import json

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = train(args, arm, rank)
    finally:
        dist.barrier()
        dist.destroy_process_group()
    Path(folder, f"{arm}-{rank}.json").write_text(json.dumps(result))


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    """Run the three arms; write the JSON with the memory ratio and the loss differences."""
    import json

    import torch.multiprocessing as mp

    args = parse_args()
    results: dict[str, Any] = {"single": train(args, "single", 0)}
    with tempfile.TemporaryDirectory() as folder:
        for arm in ("ddp", "fsdp"):
            mp.spawn(worker, args=(args, arm, free_port(), folder), nprocs=WORLD)
            ranks = [json.loads(Path(folder, f"{arm}-{r}.json").read_text()) for r in range(2)]
            results[arm] = {"losses": ranks[0]["losses"], "memory": [r["memory"] for r in ranks],
                            "ranks_agree": ranks[0]["losses"] == ranks[1]["losses"]}  # fmt: skip
    single = results["single"]["losses"]
    for arm in ("ddp", "fsdp"):
        losses = results[arm]["losses"]
        pairs = zip(losses, single, strict=True)
        results[arm]["max_loss_difference"] = max(abs(a - b) for a, b in pairs)
    largest = {arm: max(m["total"] for m in results[arm]["memory"]) for arm in ("ddp", "fsdp")}
    results["fsdp_over_ddp"] = largest["fsdp"] / largest["ddp"]
    path = write_json("fsdp_memory", args, results, args.output)
    mib = 2**20
    print(f"{args.model}, full fine-tuning, fp32, {args.steps} steps, 2 x {args.batch_size} x "
          f"{args.seq_len} tokens")  # fmt: skip
    for arm in ("ddp", "fsdp"):
        parts = results[arm]["memory"][0]
        print(f"  {arm}: per process {parts['total'] / mib:.1f} MiB (parameters "
              f"{parts['parameters'] / mib:.1f}, gradients {parts['gradients'] / mib:.1f}, "
              f"AdamW {parts['optimizer'] / mib:.1f}); losses vs one process: max difference "
              f"{results[arm]['max_loss_difference']:.2e}")  # fmt: skip
    print(f"  FSDP / DDP per process: {results['fsdp_over_ddp']:.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
