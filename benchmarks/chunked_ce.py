"""The chunked LM-head cross-entropy (models/chunked_loss.py) against the plain one: training
memory and step time of a LoRA step on SmolLM2-135M at batch 4 x 512 tokens.

Both arms are one PeftkitTrainer on one LoRA model (r 8, all-linear, otherwise LoRA's defaults:
dropout 0.05, the fast path), its `compute_loss` with `chunked_loss` on or off, then backward and
a fused AdamW step; the batches are fixed-length chunks of real review text. First each arm's loss
on the same batch (the same dropout masks: seeded alike) is compared; then each arm's training
memory is measured over one step (after a step that made AdamW's state) as the run summary
measures it (training/memory_probe.py): AdamW's state and the gradients held when the step starts
plus the peak of the step's allocations (torch profiler events), the model's weights left out;
then the arms' step times alternate round by round (`interleaved`), a few steps each.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/chunked_ce.py          # smollm2-135m
    .venv/bin/python benchmarks/chunked_ce.py --smoke --output /tmp/chunked_ce_smoke.json
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from common import (
    add_step_flags,
    base_parser,
    batches_of,
    interleaved,
    markdown_table,
    median,
    parse_with_smoke,
    setup,
    timed,
    write_json,
)


def parse_args() -> Any:
    """Command-line flags."""
    parser = base_parser(__doc__.split("\n\n")[0], "smollm2-135m")
    add_step_flags(parser, batch=4, seq=512, rounds=3, steps=1)
    return parse_with_smoke(parser, model="tiny-llama", batch=2, seq=32, rounds=1)


def trainer_for(model: Any, folder: str) -> Any:
    """A PeftkitTrainer over the model (only its compute_loss is used)."""
    import torch
    from transformers import TrainingArguments

    from peftkit.training.trainer import PeftkitTrainer

    arguments = TrainingArguments(
        output_dir=folder, use_cpu=not torch.cuda.is_available(), report_to="none"
    )
    return PeftkitTrainer(model=model, args=arguments)


def main() -> None:
    """Run the arms and write the JSON."""
    args = parse_args()
    setup(args)
    import torch

    import peftkit
    from peftkit.models import load_model
    from peftkit.training.memory_probe import peak_of_allocations

    load_before = os.getloadavg()
    model, tokenizer = load_model(args.model, "causal-lm", seed=args.seed)
    config = peftkit.LoraConfig(rank=8, target_modules="all-linear")
    model = peftkit.apply(model, config).train()
    batches = batches_of(tokenizer, args.batch, args.seq, 2)
    counts = [(b["labels"][:, 1:] != -100).sum() for b in batches]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    folder = tempfile.mkdtemp(prefix="chunked_ce_")
    trainer = trainer_for(model, folder)
    position = [0]

    def step(chunked: bool) -> float:
        trainer.chunked_loss = chunked
        index = position[0] % len(batches)
        position[0] += 1
        loss = trainer.compute_loss(model, dict(batches[index]), False, counts[index])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def loss_on_first_batch(chunked: bool) -> float:
        trainer.chunked_loss = chunked
        torch.manual_seed(args.seed)  # the same dropout masks for both arms
        with torch.no_grad():
            return float(trainer.compute_loss(model, dict(batches[0]), False, counts[0]))

    losses = {"plain": loss_on_first_batch(False), "chunked": loss_on_first_batch(True)}
    assert trainer.chunked_loss_refused is None, trainer.chunked_loss_refused

    def memory(chunked: bool) -> int:
        """Training memory of one step: held state + the peak of its allocations."""
        from torch.profiler import ProfilerActivity, profile

        held = sum(
            t.nbytes
            for state in optimizer.state.values()
            for t in state.values()
            if torch.is_tensor(t)
        )
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            step(chunked)
        events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda event: event.start_ns())
        return held + peak_of_allocations([e.nbytes() for e in events])

    step(False)  # AdamW's state: made once, outside every measurement
    memory_bytes = {"plain": memory(False), "chunked": memory(True)}
    seconds = interleaved(
        {
            "plain": timed(lambda: step(False), args.steps),
            "chunked": timed(lambda: step(True), args.steps),
        },
        args.rounds,
    )
    load_after = os.getloadavg()
    mib = 1 << 20
    results = {
        "method": {
            "name": "lora",
            "rank": config.rank,
            "alpha": config.alpha,
            "dropout": config.dropout,
            "target_modules": config.target_modules,
        },
        "batch": args.batch,
        "seq": args.seq,
        "vocab": model.config.vocab_size,
        "loss_first_batch": losses,
        "loss_difference": abs(losses["plain"] - losses["chunked"]),
        "training_memory_mib": {arm: b / mib for arm, b in memory_bytes.items()},
        "memory_ratio": memory_bytes["chunked"] / memory_bytes["plain"],
        "step_seconds": seconds,
        "median_step_seconds": {arm: median(s) for arm, s in seconds.items()},
        "step_ratio": median(seconds["chunked"]) / median(seconds["plain"]),
        "memory_measure": "AdamW state held at the step's start + peak of the step's allocations "
        "(torch profiler memory events), weights excluded, as training/memory_probe.py",
        "load_average_before_after": [load_before, load_after],
        "shared_machine": "2 cores shared with other helpers' jobs; the heavy lock held",
    }
    rows = [
        [arm, f"{memory_bytes[arm] / mib:.0f}", f"{median(seconds[arm]):.2f}", f"{losses[arm]:.6f}"]
        for arm in ("plain", "chunked")
    ]
    print(markdown_table(["arm", "training memory MiB", "median step s", "loss (batch 1)"], rows))
    print(f"memory ratio {results['memory_ratio']:.3f}, step ratio {results['step_ratio']:.3f}")
    path = write_json("chunked_ce", args, results, args.output)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
