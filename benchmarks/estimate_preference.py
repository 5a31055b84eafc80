"""The memory estimator against the measured training memory of real preference and RL steps:
DPO with LoRA (the reference is the adapter switched off), DPO with full fine-tuning (a frozen
copy of the policy), KTO with LoRA, and GRPO with LoRA (rollouts, then the step; with and
without the KL term's reference), each a real `peftkit train` run of its tiny recipe
(recipes/tiny-dpo-lora.yaml, tiny-kto-lora.yaml, tiny-grpo-lora.yaml) for 2 optimizer steps on
rows BUILT here so every batch has the same length. The measured figure is the run summary's
`training_memory_mib` (the peak of live tensor bytes over the 2 steps, torch profiler allocation
events: training/memory_probe.py; weights and a frozen copy, resident before, left out) and the
estimate is the summary's own `estimated_training_memory_mib` for the same recipe.

With --smollm2, also issue #31 item 2 at the allocator: LoRA-DPO against full-DPO on SmolLM2-135M
(same BUILT pairs, batch 8, max_length 64; each arm a `peftkit train` run of 2 steps in this
process, one after the other: allocation sizes do not depend on timing, so the figures repeat to
the byte). Training memory leaves out what is resident before training (the weights, and
full-DPO's frozen reference copy), so the JSON also gives all tensors: weights + copy + training.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/estimate_preference.py
    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/estimate_preference.py --smollm2 \
        --output benchmarks/results/preference_memory_smollm2.json
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Any

from common import base_parser, markdown_table, parse_with_smoke, setup, write_json

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
LORA = ["method.name=lora", "method.rank=8", "method.alpha=16", "method.dropout=0.0",
        "method.target_modules=all-linear"]  # fmt: skip
# (case, recipe, data kind, overrides)
CASES: list[tuple[str, str, str, list[str]]] = [
    ("dpo-lora", "tiny-dpo-lora.yaml", "pairs", []),
    ("dpo-full", "tiny-dpo-lora.yaml", "pairs", ["method={name: full}"]),
    ("kto-lora", "tiny-kto-lora.yaml", "unpaired", []),
    ("grpo-lora", "tiny-grpo-lora.yaml", "prompts", []),
    ("grpo-lora-kl", "tiny-grpo-lora.yaml", "prompts", ["grpo.beta=0.1"]),
]


def words(count: int) -> list[str]:
    """`count` distinct two-letter words: every row the same number of bytes (tiny-llama's
    tokenizer reads bytes), so every batch pads to the same length."""
    letters = string.ascii_lowercase
    return [a + b for a in letters for b in letters][:count]


def rows(kind: str, count: int) -> list[dict[str, Any]]:
    """BUILT rows of one length: copy two words (chosen) or swap them (rejected)."""
    vocabulary = words(2 * count)
    made = []
    for index in range(count):
        first, second = vocabulary[2 * index], vocabulary[2 * index + 1]
        prompt = f"copy: {first} {second}\n"
        chosen, rejected = f"{first} {second}", f"{second} {first}"
        if kind == "pairs":
            made.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        elif kind == "unpaired":
            good = index % 2 == 0
            made.append({"prompt": prompt, "completion": chosen if good else rejected,
                         "label": good})  # fmt: skip
        else:
            made.append({"prompt": prompt})
    return made


def data_overrides(kind: str, path: Path) -> list[str]:
    """The recipe keys that point a tiny recipe at the BUILT rows."""
    keys = ["task.dataset=null", f"task.train_file={path}", "task.max_eval_examples=4"]
    if kind == "prompts":
        keys += ["task.rewards=[format]", "task.reward_weights=[1.0]", "task.max_new_tokens=4"]
    return keys


def run(recipe: Path, overrides: list[str], folder: Path) -> dict[str, Any]:
    """One `peftkit train` run; its summary.json."""
    from peftkit.cli import main

    code = main(["train", str(recipe), *sum((["--set", o] for o in overrides), []),
                 "--set", f"output_dir={folder}"])  # fmt: skip
    if code != 0:
        raise SystemExit(f"peftkit train {recipe.name} {overrides} exited {code}")
    return json.loads((folder / "summary.json").read_text())


def measured_case(name: str, recipe: str, kind: str, extra: list[str], batch: int,
                  steps: int, work: Path) -> dict[str, Any]:  # fmt: skip
    """A case's run: measured and estimated training memory, and what the summary said."""
    data = work / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(kind, 4 * batch)))
    overrides = [*LORA, *data_overrides(kind, data), f"training.batch_size={batch}",
                 f"training.max_steps={steps}", "training.logging_steps=1", *extra]  # fmt: skip
    summary = run(RECIPES / recipe, overrides, work / name)
    measured, estimated = summary["training_memory_mib"], summary["estimated_training_memory_mib"]
    return {
        "case": name, "recipe": f"recipes/{recipe}", "overrides": overrides[len(LORA):],
        "method": summary.get("method"), "batch_size": batch,
        "estimate_settings": summary.get("estimate_settings"),
        "measured_mib": measured, "estimated_mib": estimated,
        "ratio": estimated / measured if estimated else None,
        "reference": summary.get("reference"),
        "reference_copy_mib": summary.get("reference_copy_mib"),
        "weight_memory_mib": summary.get("weight_memory_mib"),
        "estimate_note": summary.get("estimate_note"),
    }  # fmt: skip


def smollm2(args: Any, work: Path) -> list[dict[str, Any]]:
    """Issue #31 item 2: LoRA-DPO and full-DPO training memory on SmolLM2-135M, same batch."""
    arms = [("lora", []), ("full", ["method={name: full}"])]  # lora: the recipe's method
    found = []
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows("pairs", 4 * args.batch_size)))
    for arm, method in arms:
        overrides = ["model=smollm2-135m", *data_overrides("pairs", data), *method,
                     f"training.batch_size={args.batch_size}", f"training.max_steps={args.steps}",
                     "training.learning_rate=1e-5", "task.max_length=64"]  # fmt: skip
        summary = run(RECIPES / "tiny-dpo-lora.yaml", overrides, work / f"smollm2-{arm}")
        found.append({"arm": arm, "overrides": overrides,
                      "training_memory_mib": summary["training_memory_mib"],
                      "estimated_training_memory_mib": summary["estimated_training_memory_mib"],
                      "weight_memory_mib": summary.get("weight_memory_mib"),
                      "reference": summary.get("reference"),
                      "reference_copy_mib": summary.get("reference_copy_mib"),
                      "measure": summary.get("training_memory_measure")})  # fmt: skip
    for entry in found:  # what is resident before training: the weights and a frozen copy
        entry["all_tensors_mib"] = (entry["training_memory_mib"] + entry["weight_memory_mib"]
                                    + (entry["reference_copy_mib"] or 0))  # fmt: skip
    lora, full = found
    found.append({"arm": "ratio lora / full",
                  "training_memory": lora["training_memory_mib"] / full["training_memory_mib"],
                  "all_tensors": lora["all_tensors_mib"] / full["all_tensors_mib"]})  # fmt: skip
    return found


def main() -> None:
    """Run the cases (or the SmolLM2 arms), print the table, write the JSON."""
    parser = base_parser(__doc__.split("\n\n")[0], "tiny-llama")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--smollm2", action="store_true", help="LoRA-DPO vs full-DPO, SmolLM2")
    args = parse_with_smoke(parser, batch_size=4, steps=2)
    setup(args)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if args.smollm2:
            results: Any = smollm2(args, work)
            print(json.dumps(results, indent=2))
            name = "preference_memory_smollm2"
        else:
            cases = CASES[:1] + CASES[3:4] if args.smoke else CASES
            results = [measured_case(*case, args.batch_size, args.steps, work) for case in cases]
            print(markdown_table(
                ["case", "measured MiB", "estimated MiB", "estimate / measured"],
                [[r["case"], f"{r['measured_mib']:.2f}", f"{r['estimated_mib']:.2f}",
                  f"{r['ratio']:.3f}"] for r in results],
            ))  # fmt: skip
            name = "estimate_preference"
    results = {"shared_machine": "2 cores shared with other jobs (memory figures do not depend "
               "on load)", "results": results}  # fmt: skip
    print(f"wrote {write_json(name, args, results, args.output)}")


if __name__ == "__main__":
    main()
