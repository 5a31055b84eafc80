"""bf16 mixed precision on the CPU against fp32: training tokens/s and the task metric at equal
budget (LoRA on MiniLM, Amazon Fine Foods reviews, recipes/minilm-lora.yaml's settings).

bf16 runs through the Trainer's own mixed precision: TrainingArguments(bf16=True, use_cpu=True)
makes accelerate wrap the forward in torch.autocast("cpu", dtype=torch.bfloat16); the weights,
gradients and AdamW state stay fp32. It pays off only where the CPU multiplies bf16 natively
(AVX512-BF16, or AMX tiles); the script says what this machine has. Each precision trains the
same fresh model (same seed, same data order, same step budget), then both are evaluated in fp32
on the same held-out reviews. Speed: median step time over each run, and a second, interleaved
check (alternating short rounds of both precisions in the same process) for the ratio.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/precision.py      # minilm
    .venv/bin/python benchmarks/precision.py --model tiny-bert --steps 4 --eval-examples 32
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from common import (
    StepTimer,
    base_parser,
    interleaved,
    machine,
    markdown_table,
    median,
    parse_with_smoke,
    setup,
    write_json,
)

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "minilm-lora.yaml"


def parse_args() -> Any:
    """Command-line flags."""
    parser = base_parser(__doc__.split("\n\n")[0], "minilm")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per precision")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per batch")
    parser.add_argument("--eval-examples", type=int, default=1000, help="held-out reviews")
    parser.add_argument("--check-steps", type=int, default=8, help="steps per interleaved round")
    parser.add_argument("--check-rounds", type=int, default=2, help="interleaved rounds")
    return parse_with_smoke(
        parser,
        model="tiny-bert",
        steps=2,
        batch_size=4,
        eval_examples=16,
        check_steps=2,
        check_rounds=1,
    )


def trainer_for(model: Any, tokenizer: Any, data: Any, recipe: Any, bf16: bool, steps: int,
                timer: StepTimer) -> Any:  # fmt: skip
    """A PeftkitTrainer with peftkit's TrainingArguments, switched to bf16 mixed precision."""
    from peftkit.data.collate import Collator
    from peftkit.training.run import training_arguments
    from peftkit.training.trainer import PeftkitTrainer

    recipe = replace(recipe, training=replace(recipe.training, max_steps=steps))
    args = training_arguments(recipe, Path(tempfile.mkdtemp(prefix="peftkit-precision-")))
    # The change train.py needs (see RESULTS.md): TrainingArguments(..., bf16=recipe's choice).
    args = type(args)(**{**args.to_dict(), "bf16": bf16, "use_cpu": True})
    collator = Collator(tokenizer.pad_token_id)
    timer.count = lambda: collator.tokens_seen
    return PeftkitTrainer(
        model=model, args=args, train_dataset=data.train, data_collator=collator,
        processing_class=tokenizer, callbacks=[timer.callback()],
    )  # fmt: skip


def train_one(recipe: Any, bf16: bool, steps: int) -> dict[str, Any]:
    """Train a fresh model at one precision; its speed, metric and the trained model."""
    from transformers import set_seed

    import peftkit
    from peftkit.data.collate import Collator
    from peftkit.training import evaluate, load_for_plan

    set_seed(recipe.training.seed)
    from peftkit.plan import resolve

    plan = resolve(recipe)
    model, tokenizer, data = load_for_plan(plan)
    set_seed(recipe.training.seed)
    model = peftkit.apply(model, plan.method_config)
    timer = StepTimer()
    trainer = trainer_for(model, tokenizer, data, recipe, bf16, steps, timer)
    mixed = trainer.accelerator.mixed_precision  # "bf16" proves autocast is on, "no" fp32
    result = trainer.train()
    metrics = evaluate(model, plan, data, Collator(tokenizer.pad_token_id))
    tokens = [b - a for a, b in zip([0, *timer.counts], timer.counts, strict=False)]
    rates = [t / s for t, s in zip(tokens[1:], timer.seconds[1:], strict=True)]
    return {
        "precision": "bf16-mixed" if bf16 else "fp32",
        "accelerate_mixed_precision": mixed,
        "train_seconds": sum(timer.seconds),
        "train_tokens": timer.counts[-1] if timer.counts else 0,
        "tokens_per_second": timer.counts[-1] / sum(timer.seconds) if timer.counts else 0.0,
        "median_step_tokens_per_second": median(rates) if rates else 0.0,
        "final_train_loss": float(result.training_loss),
        "accuracy": metrics["accuracy"],
        "model": model,
        "tokenizer": tokenizer,
        "data": data,
    }


def speed_check(runs: list[dict[str, Any]], recipe: Any, args: Any) -> dict[str, float]:
    """Alternate short rounds of both precisions in this process: tokens/s per precision."""
    totals = {run["precision"]: [0, 0.0] for run in runs}

    def arm(run: dict[str, Any]) -> Any:
        def go() -> list[float]:
            timer = StepTimer()
            bf16 = run["precision"] != "fp32"
            trainer = trainer_for(run["model"], run["tokenizer"], run["data"], recipe, bf16,
                                  args.check_steps, timer)  # fmt: skip
            trainer.train()
            totals[run["precision"]][0] += timer.counts[-1] - timer.counts[0]
            totals[run["precision"]][1] += sum(timer.seconds[1:])
            return timer.seconds[1:]

        return go

    interleaved({run["precision"]: arm(run) for run in runs}, args.check_rounds)
    return {name: tokens / seconds for name, (tokens, seconds) in totals.items()}


def main() -> None:
    """Train at both precisions, check speed interleaved, print and save the comparison."""
    args = parse_args()
    setup(args)
    import torch

    from peftkit.recipe import load_recipe

    info = machine()
    bf16_ok = torch.backends.mkldnn.is_available() and (info["avx512_bf16"] or info["amx_bf16"])
    print(f"CPU: capability {info['cpu_capability']}, avx512_bf16 {info['avx512_bf16']}, "
          f"amx_bf16 {info['amx_bf16']}")  # fmt: skip
    if not bf16_ok:
        print("This CPU has no native bf16 multiply (no AVX512-BF16 or AMX): bf16 autocast runs, "
              "but emulated, and is expected to be slower than fp32.")  # fmt: skip
    recipe = load_recipe(RECIPE, [
        f"model={args.model}", f"training.batch_size={args.batch_size}",
        f"task.max_eval_examples={args.eval_examples}", f"training.seed={args.seed}",
        "training.logging_steps=1000",
    ])  # fmt: skip
    runs = [train_one(recipe, bf16, args.steps) for bf16 in (False, True)]
    check = speed_check(runs, recipe, args)
    fp32 = runs[0]
    rows, results = [], []
    for run in runs:
        ratio = run["tokens_per_second"] / fp32["tokens_per_second"]
        check_ratio = check[run["precision"]] / check["fp32"]
        delta = (run["accuracy"] - fp32["accuracy"]) * 100
        rows.append([run["precision"], f"{run['tokens_per_second']:.0f}", f"{ratio:.2f}",
                     f"{check_ratio:.2f}", f"{run['accuracy']:.4f}", f"{delta:+.1f}",
                     f"{run['final_train_loss']:.4f}"])  # fmt: skip
        kept = {k: v for k, v in run.items() if k not in ("model", "tokenizer", "data")}
        results.append({**kept, "speed_ratio": ratio, "interleaved_tokens_per_second":
                        check[run["precision"]], "interleaved_ratio": check_ratio})  # fmt: skip
    print(f"{args.model}, LoRA, {args.steps} steps x batch {args.batch_size}, {args.threads} "
          f"threads, accuracy on {len(runs[0]['data'].eval)} held-out reviews")  # fmt: skip
    header = ["precision", "tokens/s (run)", "vs fp32", "vs fp32 (interleaved)", "accuracy",
              "points vs fp32", "train loss"]  # fmt: skip
    print(markdown_table(header, rows))
    summary = {"bf16_native": bf16_ok, "runs": results}
    print(f"wrote {write_json('precision', args, summary, args.output)}")


if __name__ == "__main__":
    main()
