"""GRPO rollout speed: peftkit's rollouts (training/rollouts.py) against TRL's default generation
path (transformers' generate), on the same trainer, model and prompts.

One GRPO trainer is built by peftkit's builder on SmolLM2-135M with a LoRA r8 adapter on every
linear layer (its B drawn at random, so the live adapter changes the outputs; it stays unmerged),
the prompts are the first bank-sql training questions (question + schema, rendered as TRL
renders them), each repeated num_generations times as TRL's sampler does. Each round runs both
arms, in rotating order, from the same seed: TRL's `_generate_single_turn` and peftkit's
override of it. A round's rate is completion tokens / seconds; the ratio is taken per round.
Before the rounds, one call per arm stopping after the first token warms both up (not kept);
after them, the same call times the prefill's share.
The arms draw the same random stream, so their completions are compared token for token too.
Prints a table and writes JSON.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/grpo_rollouts.py
    .venv/bin/python benchmarks/grpo_rollouts.py --smoke      # tiny-llama, 2 x 2, 4 tokens
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from common import base_parser, clock, machine, parse_with_smoke, setup, write_json

ARMS = ("trl", "peftkit")


def parse_args() -> argparse.Namespace:
    """Command-line flags."""
    parser = base_parser(__doc__.split("\n\n")[0], "smollm2-135m")
    parser.add_argument("--prompts", type=int, default=8, help="distinct bank-sql prompts")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt")
    parser.add_argument("--new-tokens", type=int, default=64, help="max_completion_length")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (all linear layers)")
    return parse_with_smoke(
        parser, model="tiny-llama", prompts=2, generations=2, new_tokens=4, rounds=1
    )


def build(args: argparse.Namespace, folder: Path) -> tuple[Any, list[list[int]]]:
    """peftkit's GRPO trainer over the adapted model, and TRL's prompt ids (each repeated)."""
    import torch

    import peftkit
    from peftkit.apps import register
    from peftkit.data.bundled import load_bundled
    from peftkit.models import load_model
    from peftkit.recipe import Recipe, TrainConfig
    from peftkit.tasks.base import TrainerParts
    from peftkit.tasks.config import GRPOConfig, TaskConfig
    from peftkit.tasks.types import get_task_type
    from peftkit.training.grpo import build_grpo_trainer
    from peftkit.training.run import training_argument_values

    register()
    model, tokenizer = load_model(args.model, "causal-lm", seed=args.seed)
    rows = load_bundled("bank-sql")[0][: args.prompts]
    task = TaskConfig(type="grpo", train_file="unused.jsonl", rewards=("format",))
    data = get_task_type("grpo").prepare(task, tokenizer, rows, rows)
    batch = args.prompts * args.generations
    recipe = Recipe(
        model=args.model, task=task, method={"name": "lora"},
        grpo=GRPOConfig(num_generations=args.generations, max_completion_length=args.new_tokens),
        training=TrainConfig(max_steps=1, batch_size=batch, seed=args.seed),
        output_dir=str(folder / "run"),
    )  # fmt: skip
    config = peftkit.LoraConfig(rank=args.rank, dropout=0.0, target_modules="all-linear")
    model = peftkit.apply(model, config)
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
    state = peftkit.api.applied(model)
    arguments = training_argument_values(recipe, folder / "run")
    arguments.update(report_to="none", disable_tqdm=True)
    hooks = state.method.training_hooks(model, state.config)
    parts = TrainerParts(recipe, model, tokenizer, data, arguments, [], hooks, resumed=False)
    trainer = build_grpo_trainer(parts).trainer
    model.train()  # as during GRPO training (dropout is off: TRL's disable_dropout)
    texts = [record["prompt"] for record in data.train_records for _ in range(args.generations)]
    return trainer, trainer._tokenize_prompts(texts)[0]


def first_token_seconds(trainer: Any, run: dict[str, Any], seed: int) -> dict[str, float]:
    """Each arm's seconds for one call that stops after the first token (mostly the prefill)."""
    import torch

    length = trainer.max_completion_length
    seconds = {}
    try:
        trainer.max_completion_length = trainer.generation_config.max_new_tokens = 1
        trainer.generation_kwargs["max_new_tokens"] = 1
        for arm in ARMS:
            torch.manual_seed(seed)
            start = clock()
            run[arm]()
            seconds[arm] = clock() - start
    finally:
        trainer.max_completion_length = trainer.generation_config.max_new_tokens = length
        trainer.generation_kwargs["max_new_tokens"] = length
    return seconds


def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    """Run the rounds, print the table, write the JSON."""
    args = parse_args()
    setup(args)
    import torch
    from trl import GRPOTrainer

    with tempfile.TemporaryDirectory() as folder:
        trainer, prompt_ids = build(args, Path(folder))
        run = {
            "trl": lambda: GRPOTrainer._generate_single_turn(
                trainer, prompt_ids, None, {}, args.generations
            ),
            "peftkit": lambda: trainer._generate_single_turn(
                prompt_ids, None, {}, args.generations
            ),
        }
        first_token_seconds(trainer, run, args.seed)  # a warm-up of both paths, not kept
        rates: dict[str, list[float]] = {arm: [] for arm in ARMS}
        tokens: dict[str, list[int]] = {arm: [] for arm in ARMS}
        same: list[float] = []
        for index in range(args.rounds):
            order = ARMS[index % 2 :] + ARMS[: index % 2]
            completions = {}
            for arm in order:
                torch.manual_seed(args.seed + index)
                start = clock()
                completions[arm] = run[arm]()[0]
                seconds = clock() - start
                tokens[arm].append(sum(len(ids) for ids in completions[arm]))
                rates[arm].append(tokens[arm][-1] / seconds)
                print(f"round {index} {arm}: {tokens[arm][-1]} tokens, {seconds:.2f} s, "
                      f"{rates[arm][-1]:.1f} tokens/s", flush=True)  # fmt: skip
            pairs = zip(completions["trl"], completions["peftkit"], strict=True)
            same.append(statistics.mean(float(a == b) for a, b in pairs))
        first = first_token_seconds(trainer, run, args.seed)
    ratios = [p / t for p, t in zip(rates["peftkit"], rates["trl"], strict=True)]
    lengths = [len(ids) for ids in prompt_ids]
    results = {
        "rows": len(prompt_ids),
        "prompt_tokens": spread([float(n) for n in lengths]),
        "completion_tokens": tokens,
        "tokens_per_s": {arm: {"rounds": rates[arm], **spread(rates[arm])} for arm in ARMS},
        "speedup_per_round": ratios,
        "speedup": spread(ratios),
        "identical_completions": same,  # per round: fraction of rows with the same token ids
        "first_token_seconds": first,  # one call with max_completion_length 1: the prefill
        "note": "rollout tokens/s = completion tokens (EOS included) / wall seconds of one call; "
        "2 CPU cores shared with other jobs (see machine.load_average)",
    }
    print(f"peftkit / trl rollout tokens/s: median {statistics.median(ratios):.2f}x "
          f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)}); identical: {same}")  # fmt: skip
    path = write_json("grpo_rollouts", args, results, args.output)
    print(f"wrote {path} on {machine()['cpu_model']}")


if __name__ == "__main__":
    main()
