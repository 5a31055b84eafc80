"""peftkit's LoRA training step against a bare PyTorch loop with HF PEFT: framework overhead, and
separately what peftkit's fast LoRA forward saves.

Same base weights, same LoRA settings (PEFT, r 8, alpha 16, dropout 0.05, the architecture's
default targets), same batch size, same fixed-length chunks of real review text, same optimizer
(the Trainer's default fused AdamW), clipping and linear schedule. Three arms: a bare loop over
PEFT's LoRA model (PEFT's forward); peftkit's Trainer path (PeftkitTrainer with HooksCallback and
TrainingArguments from peftkit.training.run's training_arguments(recipe)) with `fast_path: false`,
so its LoRA layers run PEFT's own forward and the difference from the bare loop is the framework's
overhead alone; and the same Trainer path with the fast path on (the default), whose difference is
what the fast path saves. Each step is timed end to end (data, forward, backward, clipping,
optimizer, scheduler, callbacks, logging); the arms alternate round by round in one process, and
the first step of every round (optimizer state allocation) is dropped. Model load and evaluation
are not timed.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/lora_overhead.py   # smollm2-135m
    .venv/bin/python benchmarks/lora_overhead.py --smoke        # tiny-llama, 2 steps, 1 round
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path
from typing import Any

from common import (
    StepTimer,
    base_parser,
    clock,
    interleaved,
    markdown_table,
    median,
    packed_lm_features,
    parse_with_smoke,
    setup,
    write_json,
)

LEARNING_RATE = 2e-4
BARE = "bare PyTorch + PEFT"
PLAIN = "peftkit Trainer, fast path off"
FAST = "peftkit Trainer, fast path on"


def parse_args() -> Any:
    """Command-line flags."""
    parser = base_parser(__doc__.split("\n\n")[0], "smollm2-135m")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per arm per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per arm")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    return parse_with_smoke(parser, model="tiny-llama", steps=3, rounds=1, seq_len=16)


def peftkit_arm(
    model: Any, features: list, tokenizer: Any, args: Any, folder: Path, fast_path: bool
) -> Any:
    """A function running `steps` Trainer steps with peftkit's own arguments and callback, its
    LoRA layers on the fast path or on PEFT's own forward."""
    import peftkit
    from peftkit.api import applied
    from peftkit.data.collate import Collator
    from peftkit.recipe import Recipe, TaskConfig, TrainConfig
    from peftkit.training.run import training_arguments
    from peftkit.training.trainer import HooksCallback, PeftkitTrainer

    config = peftkit.config_for("lora", fast_path=fast_path)
    model = peftkit.apply(model, config)
    hooks = applied(model).method.training_hooks(model, config)
    recipe = Recipe(
        model=args.model,
        task=TaskConfig(type="causal-lm", dataset="amazon-reviews"),
        training=TrainConfig(max_steps=args.steps, batch_size=args.batch_size,
                             learning_rate=LEARNING_RATE, seed=args.seed),
    )  # fmt: skip
    training = training_arguments(recipe, folder)

    def run() -> list[float]:
        timer = StepTimer()
        trainer = PeftkitTrainer(
            model=model, args=training, train_dataset=features,
            data_collator=Collator(tokenizer.pad_token_id), processing_class=tokenizer,
            callbacks=[HooksCallback(hooks), timer.callback()], hooks=hooks,
        )  # fmt: skip
        trainer.train()
        return timer.seconds[1:]

    return run, training


def bare_arm(model: Any, features: list, tokenizer: Any, args: Any, training: Any) -> Any:
    """A function running `steps` steps of a hand-written loop over HF PEFT's LoRA model."""
    import peft
    import torch
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    from peftkit.data.collate import Collator
    from peftkit.targeting import default_targets

    config = peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=default_targets(model),
        task_type="CAUSAL_LM",
    )  # fmt: skip
    model = peft.get_peft_model(model, config)
    model.train()
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(features, batch_size=args.batch_size, shuffle=True, generator=generator,
                        collate_fn=Collator(tokenizer.pad_token_id))  # fmt: skip

    def run() -> list[float]:
        trainable = [p for p in model.parameters() if p.requires_grad]
        # The same optimizer the Trainer builds by default (fused AdamW, no weight decay here).
        optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, fused=True)
        warmup = math.ceil(training.warmup_steps * args.steps)
        schedule = get_linear_schedule_with_warmup(optimizer, warmup, args.steps)
        seconds, last = [], clock()
        batches = iter(loader)
        for _ in range(args.steps):
            batch = next(batches)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, training.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            now = clock()
            seconds.append(now - last)
            last = now
        return seconds[1:]

    return run


def main() -> None:
    """Build both arms on copies of one model, alternate them, print and save the ratio."""
    args = parse_args()
    setup(args)
    from peftkit.models import load_model

    model, tokenizer = load_model(args.model, "causal-lm", seed=args.seed)
    count = args.batch_size * args.steps * 2
    features = packed_lm_features(tokenizer, count, args.seq_len)
    with tempfile.TemporaryDirectory() as folder:
        plain_run, training = peftkit_arm(
            copy.deepcopy(model), features, tokenizer, args, Path(folder) / "plain", False
        )
        fast_run, _ = peftkit_arm(
            copy.deepcopy(model), features, tokenizer, args, Path(folder) / "fast", True
        )
        bare_run = bare_arm(model, features, tokenizer, args, training)
        seconds = interleaved({BARE: bare_run, PLAIN: plain_run, FAST: fast_run}, args.rounds)
    base = median(seconds[BARE])
    tokens = args.batch_size * args.seq_len
    results = []
    for name, values in seconds.items():
        step = median(values)
        results.append({"arm": name, "median_step_seconds": step,
                        "tokens_per_second": tokens / step, "ratio_to_bare": step / base,
                        "step_seconds": values})  # fmt: skip
    ratios = {r["arm"]: r["ratio_to_bare"] for r in results}
    overhead = ratios[PLAIN] - 1  # the Trainer path on PEFT's forward against the bare loop
    fast_path = ratios[FAST] / ratios[PLAIN]  # the fast path's step time against PEFT's forward
    rows = [
        [r["arm"], f"{r['median_step_seconds']:.3f}", f"{r['tokens_per_second']:.0f}",
         f"{r['ratio_to_bare']:.3f}", len(r["step_seconds"])]
        for r in results
    ]  # fmt: skip
    header = ["arm", "median step s", "tokens/s", "step time / bare", "timed steps"]
    print(f"{args.model}, LoRA r 8, batch {args.batch_size} x {args.seq_len} tokens, "
          f"{args.threads} threads")  # fmt: skip
    print(markdown_table(header, rows))
    verdict = "within" if overhead <= 0.05 else "OVER"
    print(f"peftkit framework overhead (fast path off): {overhead * 100:+.1f}% "
          f"({verdict} the 5% target)")  # fmt: skip
    print(f"fast path: {fast_path:.3f}x the step time of the same Trainer path on PEFT's forward")
    summary = {"arms": results, "overhead": overhead, "fast_path_step_ratio": fast_path,
               "timed_steps_per_arm": len(seconds[BARE])}  # fmt: skip
    path = write_json("lora_overhead", args, summary, args.output)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
