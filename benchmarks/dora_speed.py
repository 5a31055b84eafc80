"""DoRA's training step against LoRA's on SmolLM2-135M (r 8, all-linear, the default options:
dropout 0.05), with DoRA on the fast path (methods/lora/dora.py) and on PEFT's own forward.

Arms, each its own copy of one base with the same adapter initialisation seed: peftkit's LoRA (the
fast path), peftkit's DoRA (the fast path: with dropout, PEFT's formula as one function per layer,
the norm once per step) and the same DoRA model with the fast path uninstalled (PEFT's forward,
what DoRA with dropout ran before). A fused AdamW step on fixed-length chunks of real review text;
the arms alternate round by round (`interleaved`).

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/dora_speed.py         # smollm2-135m
    .venv/bin/python benchmarks/dora_speed.py --smoke --output /tmp/dora_speed_smoke.json
"""

from __future__ import annotations

import copy
import os
from typing import Any

from common import (
    adamw_step,
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
    add_step_flags(parser, batch=4, seq=256, rounds=3, steps=1)
    return parse_with_smoke(parser, model="tiny-llama", batch=2, seq=32, rounds=1)


def main() -> None:
    """Run the arms and write the JSON."""
    args = parse_args()
    setup(args)
    import torch

    import peftkit
    from peftkit.methods.lora import fast as lora_fast
    from peftkit.models import load_model

    load_before = os.getloadavg()
    base, tokenizer = load_model(args.model, "causal-lm", seed=args.seed)
    batches = batches_of(tokenizer, args.batch, args.seq, 2)
    lora_config = peftkit.LoraConfig(rank=8, target_modules="all-linear")
    dora_config = peftkit.DoraConfig(rank=8, target_modules="all-linear")
    models = {}
    for arm, config in (("lora", lora_config), ("dora", dora_config), ("dora_peft", dora_config)):
        torch.manual_seed(args.seed)
        models[arm] = peftkit.apply(copy.deepcopy(base), config)
    lora_fast.uninstall(models["dora_peft"])
    del base
    steps = {}
    for arm, model in models.items():
        steps[arm] = adamw_step(model, batches)
        steps[arm]()  # AdamW's state, the sibling groups: not timed
    arms = {arm: timed(step, args.steps) for arm, step in steps.items()}
    seconds = interleaved(arms, args.rounds)
    medians = {arm: median(s) for arm, s in seconds.items()}
    results = {
        "lora": {
            "rank": 8,
            "alpha": lora_config.alpha,
            "dropout": lora_config.dropout,
            "target_modules": "all-linear",
        },  # fmt: skip
        "batch": args.batch,
        "seq": args.seq,
        "step_seconds": seconds,
        "median_step_seconds": medians,
        "dora_over_lora": medians["dora"] / medians["lora"],
        "dora_peft_over_lora": medians["dora_peft"] / medians["lora"],
        "load_average_before_after": [load_before, os.getloadavg()],
        "shared_machine": "2 cores shared with other helpers' jobs; the heavy lock held",
    }
    rows = [[arm, f"{medians[arm]:.2f}", f"{medians[arm] / medians['lora']:.2f}"] for arm in steps]
    print(markdown_table(["arm", "median step s", "x LoRA"], rows))
    path = write_json("dora_speed", args, results, args.output)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
