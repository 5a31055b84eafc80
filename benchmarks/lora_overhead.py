"""peftkit's LoRA training step against a bare PyTorch loop with HF PEFT: framework overhead.

Same base weights, same LoRA settings (PEFT, r 8, alpha 16, dropout 0.05, the architecture's
default targets), same batch size, same fixed-length chunks of real review text, same optimizer
(the Trainer's default fused AdamW), clipping and linear schedule. peftkit's arm is its Trainer
path: PeftkitTrainer with HooksCallback and TrainingArguments from peftkit.training.run's
training_arguments(recipe). Each step is timed end to end (data, forward, backward, clipping,
optimizer, scheduler, callbacks, logging); the arms alternate round by round and the first step
of every round (optimizer state allocation) is dropped. Model load and evaluation are not timed.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/lora_overhead.py   # smollm2-135m
    .venv/bin/python benchmarks/lora_overhead.py --model tiny-llama --steps 3 --rounds 1
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
    setup,
    write_json,
)

LEARNING_RATE = 2e-4


def parse_args() -> Any:
    """Command-line flags."""
    parser = base_parser(__doc__.split("\n\n")[0], "smollm2-135m")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per arm per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per arm")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per batch")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    return parser.parse_args()


def peftkit_arm(model: Any, features: list, tokenizer: Any, args: Any, folder: Path) -> Any:
    """A function running `steps` Trainer steps with peftkit's own arguments and callback."""
    import peftkit
    from peftkit.api import applied
    from peftkit.data.collate import Collator
    from peftkit.recipe import Recipe, TaskConfig, TrainConfig
    from peftkit.training.run import training_arguments
    from peftkit.training.trainer import HooksCallback, PeftkitTrainer

    model = peftkit.apply(model, peftkit.config_for("lora"))
    config = peftkit.config_for("lora")
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
        peftkit_run, training = peftkit_arm(
            copy.deepcopy(model), features, tokenizer, args, Path(folder)
        )
        bare_run = bare_arm(model, features, tokenizer, args, training)
        seconds = interleaved({"bare PyTorch + PEFT": bare_run, "peftkit Trainer": peftkit_run},
                              args.rounds)  # fmt: skip
    base = median(seconds["bare PyTorch + PEFT"])
    tokens = args.batch_size * args.seq_len
    results = []
    for name, values in seconds.items():
        step = median(values)
        results.append({"arm": name, "median_step_seconds": step,
                        "tokens_per_second": tokens / step, "ratio_to_bare": step / base,
                        "step_seconds": values})  # fmt: skip
    overhead = results[1]["ratio_to_bare"] - 1
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
    print(f"peftkit framework overhead: {overhead * 100:+.1f}% ({verdict} the 5% target)")
    path = write_json("lora_overhead", args, {"arms": results, "overhead": overhead}, args.output)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
