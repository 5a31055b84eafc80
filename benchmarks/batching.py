"""Real tokens per second with peftkit's batching against padding every batch to the maximum
length, on variable-length real text (Amazon Fine Foods reviews, MiniLM, LoRA as in
recipes/minilm-lora.yaml).

Three arms, each one pass over the same training examples through peftkit's Trainer path
(PeftkitTrainer, TrainingArguments from peftkit.training.run.training_arguments):
  - static: random order, every batch padded to task.max_length (the baseline);
  - dynamic: random order, each batch padded to its longest example (peftkit's Collator);
  - grouped: peftkit's default, the Trainer's group_by_length sampler (LengthGroupedSampler:
    megabatches of 50 batches sorted by length) plus the Collator.
Real tokens are the non-padding tokens; all arms see the same ones, so the tokens/s ratio is the
inverse ratio of wall time. Arms alternate round by round. Packing is not offered: peftkit has no
packing collator yet (classification cannot pack without per-example attention masks).

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/batching.py        # minilm
    .venv/bin/python benchmarks/batching.py --model tiny-bert --examples 64 --rounds 1
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from common import (
    StepTimer,
    base_parser,
    interleaved,
    markdown_table,
    parse_with_smoke,
    setup,
    write_json,
)

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "minilm-lora.yaml"


def parse_args() -> Any:
    """Command-line flags."""
    parser = base_parser(__doc__.split("\n\n")[0], "minilm")
    parser.add_argument("--examples", type=int, default=800, help="training examples per pass")
    parser.add_argument("--rounds", type=int, default=2, help="alternating passes per arm")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per batch")
    parser.add_argument("--max-length", type=int, default=128, help="task.max_length (tokens)")
    return parse_with_smoke(
        parser, model="tiny-bert", examples=32, rounds=1, batch_size=8, max_length=32
    )


def pad_to_length_collator(pad_token_id: int, length: int) -> Any:
    """peftkit's Collator, except that every batch is padded to `length` (the baseline)."""
    from peftkit.data.collate import Collator

    class PadToLength(Collator):
        def _pad(self, rows: list[list[int]], value: int) -> Any:
            import torch

            return torch.tensor([row + [value] * (length - len(row)) for row in rows])

    return PadToLength(pad_token_id)


def arm(model: Any, tokenizer: Any, data: Any, recipe: Any, collator: Any, grouped: bool) -> Any:
    """A function running one pass over the training features; (seconds list, tokens)."""
    from dataclasses import replace

    from peftkit.training.run import training_arguments
    from peftkit.training.trainer import PeftkitTrainer

    training = replace(recipe.training, group_by_length=grouped, max_steps=0, epochs=1.0)
    folder = tempfile.mkdtemp(prefix="peftkit-batching-")
    args = training_arguments(replace(recipe, training=training), Path(folder))
    passes: list[dict[str, Any]] = []

    def run() -> list[float]:
        before = collator.tokens_seen
        timer = StepTimer()
        trainer = PeftkitTrainer(
            model=model, args=args, train_dataset=data.train, data_collator=collator,
            processing_class=tokenizer, callbacks=[timer.callback()],
        )  # fmt: skip
        trainer.train()
        passes.append({"seconds": sum(timer.seconds), "tokens": collator.tokens_seen - before,
                       "steps": len(timer.seconds)})  # fmt: skip
        return timer.seconds

    return run, passes


def main() -> None:
    """Run the three arms alternately, print tokens/s and the ratios, write JSON."""
    args = parse_args()
    setup(args)
    import peftkit
    from peftkit.data.collate import Collator
    from peftkit.recipe import load_recipe
    from peftkit.training import load_for_plan

    recipe = load_recipe(RECIPE, [
        f"model={args.model}", f"task.max_length={args.max_length}",
        f"task.max_train_examples={args.examples}", f"training.batch_size={args.batch_size}",
        f"training.seed={args.seed}", "training.logging_steps=1000",
    ])  # fmt: skip
    from peftkit.plan import resolve

    plan = resolve(recipe)
    model, tokenizer, data = load_for_plan(plan)
    model = peftkit.apply(model, plan.method_config)
    pad = tokenizer.pad_token_id
    arms = {
        "static (pad to max_length)": arm(
            model, tokenizer, data, recipe, pad_to_length_collator(pad, args.max_length), False
        ),
        "dynamic (pad to batch longest)": arm(model, tokenizer, data, recipe, Collator(pad), False),
        "peftkit grouped (group_by_length)": arm(
            model, tokenizer, data, recipe, Collator(pad), True
        ),
    }
    interleaved({name: run for name, (run, _) in arms.items()}, args.rounds)
    lengths = [len(f["input_ids"]) for f in data.train]
    results = []
    for name, (_, passes) in arms.items():
        tokens = sum(p["tokens"] for p in passes)
        seconds = sum(p["seconds"] for p in passes)
        results.append({"arm": name, "real_tokens": tokens, "seconds": seconds,
                        "tokens_per_second": tokens / seconds, "passes": passes})  # fmt: skip
    base = results[0]["tokens_per_second"]
    for result in results:
        result["ratio_to_static"] = result["tokens_per_second"] / base
    rows = [[r["arm"], f"{r['tokens_per_second']:.0f}", f"{r['ratio_to_static']:.2f}",
             f"{r['seconds']:.1f}", r["real_tokens"]] for r in results]  # fmt: skip
    print(f"{args.model}, LoRA, {len(lengths)} reviews, batch {args.batch_size}, max_length "
          f"{args.max_length}: mean {sum(lengths) / len(lengths):.1f} real tokens per example, "
          f"{args.rounds} passes per arm, {args.threads} threads")  # fmt: skip
    print(markdown_table(["arm", "real tokens/s", "vs static", "seconds", "real tokens"], rows))
    grouped = results[2]["ratio_to_static"]
    print(f"grouped / static = {grouped:.2f}x ({'meets' if grouped >= 1.5 else 'MISSES'} 1.5x)")
    summary = {"mean_length": sum(lengths) / len(lengths), "max_length": args.max_length,
               "arms": results}  # fmt: skip
    print(f"wrote {write_json('batching', args, summary, args.output)}")


if __name__ == "__main__":
    main()
