"""The memory estimator against the measured peak of real training steps: each method applied by
peftkit.apply to a small random model on the CPU (its prepare hook run on real batches), one
AdamW step measured by torch.profiler's allocation events (peftkit.memory.step_peak), and the
estimate for the same model, method, batch and dtype.

Shapes: a Llama-style and a GPT-2-style causal LM, hidden 256, 4 layers, 4 heads, vocabulary
2000, batch 4 x 128 tokens, fp32, so that activations are a large share of the peak; and the
demo's own encoder: every method of recipes/compare-minilm.yaml (the `make demo` comparison) on
the bundled MiniLM with its real weights, classification, at the demo's step (batch 16 x 64
tokens, the quick budget's longest review). The measurement counts tensors only, as the estimate
does, and repeats to the byte. Every estimate models the attention kernel SDPA runs on a CPU
(`attention="cpu"`), where the measurement runs.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/estimate_accuracy.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common import base_parser, markdown_table, parse_with_smoke, setup, write_json

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "compare-minilm.yaml"

# (family, method section, gradient checkpointing): a method as a recipe names it.
CASES: list[tuple[str, dict[str, Any], bool]] = [
    ("llama", {"name": "full"}, False),
    ("llama", {"name": "full"}, True),
    ("llama", {"name": "lora"}, False),
    ("llama", {"name": "lora"}, True),
    ("llama", {"name": "dora"}, False),
    ("llama", {"name": "bottleneck"}, False),
    ("llama", {"name": "prompt_tuning"}, False),
    ("llama", {"name": "prefix_tuning"}, False),
    ("llama", {"name": "child_tuning", "mode": "D"}, False),
    ("gpt2", {"name": "full"}, False),
    ("gpt2", {"name": "lora"}, False),
    ("gpt2", {"name": "bitfit"}, False),
    ("gpt2", {"name": "bitfit", "bias_groups": ["feed_forward"]}, False),
    ("gpt2", {"name": "bottleneck", "placement": "pfeiffer"}, False),
]
MIB = 2**20


def demo_methods() -> list[tuple[str, dict[str, Any]]]:
    """(label, method section) of every method the demo compares."""
    import yaml

    entries = yaml.safe_load(DEMO.read_text())["methods"]
    return [(e.get("label", e["method"]["name"]), e["method"]) for e in entries]


def demo_step() -> tuple[int, int]:
    """The demo's step: the base recipe's batch size and the quick budget's max_length."""
    import yaml

    demo = yaml.safe_load(DEMO.read_text())
    base = yaml.safe_load((DEMO.parent / demo["recipe"]).read_text())
    return base["training"]["batch_size"], demo["quick"]["task.max_length"]


def review_batch(batch_size: int, seq_len: int) -> dict[str, Any]:
    """Seeded random MiniLM token ids, every position real (the longest review), binary labels."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (batch_size, seq_len), generator=generator)
    labels = torch.randint(0, 2, (batch_size,), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def prepared(model: Any, section: dict[str, Any], batches: list[dict[str, Any]]) -> Any:
    """peftkit.apply with a method section, then its prepare hook on real batches."""
    import peftkit
    from peftkit.api import applied

    options = dict(section)
    tuned = peftkit.apply(model, options.pop("name"), **options)
    state = applied(tuned)
    prepare = state.method.training_hooks(tuned, state.config).prepare
    if prepare is not None:
        prepare(tuned, batches)
    return tuned


def minilm_model(section: dict[str, Any], batch: dict[str, Any]) -> Any:
    """The bundled MiniLM classifier with the method applied and prepared (two batches)."""
    import torch

    from peftkit.models import load_model

    torch.manual_seed(0)
    model, _ = load_model("minilm", "classification")
    return prepared(model, section, [batch, batch])


def small_config(family: str) -> Any:
    """Hidden 256, 4 layers: big enough that activations are a large share of the peak."""
    import transformers

    if family == "gpt2":
        return transformers.GPT2Config(n_embd=256, n_layer=4, n_head=4, vocab_size=2000)
    return transformers.LlamaConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=2000, max_position_embeddings=512,
    )  # fmt: skip


def causal_batch(batch_size: int, seq_len: int) -> dict[str, Any]:
    """Seeded random token ids with themselves as labels."""
    import torch

    ids = torch.randint(3, 2000, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def real_model(family: str, section: dict[str, Any], checkpointing: bool) -> Any:
    """The small model with random weights, the method applied and prepared as training does."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = small_config(family)
    config._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return prepared(model, section, [causal_batch(2, 32)])


def main() -> None:
    """Measure every case, print the table, write the JSON."""
    parser = base_parser(__doc__.split("\n\n")[0], "small")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parse_with_smoke(parser, batch_size=1, seq_len=16)
    setup(args)
    from peftkit.memory.estimate import estimate
    from peftkit.memory.step_peak import step_peak_bytes

    results = []

    def record(
        family: str, section: dict, checkpointing: bool, measured: int, found: Any, **extra: Any
    ) -> None:
        results.append({
            "family": family, "method": section, "gradient_checkpointing": checkpointing,
            **extra, "trainable_parameters": found.trainable_parameters,
            "measured_peak_bytes": measured, "estimated_peak_bytes": int(found.total),
            "ratio": found.total / measured,
            # beyond the weights: what the demo's "train MiB" and "est. MiB" columns compare
            "measured_training_bytes": measured - int(found.weights),
            "estimated_training_bytes": int(found.total - found.weights),
            "estimate": found.as_dict(),
        })  # fmt: skip

    cases = CASES[:2] if args.smoke else CASES
    for family, section, checkpointing in cases:
        model = real_model(family, section, checkpointing)
        measured = step_peak_bytes(model, causal_batch(args.batch_size, args.seq_len))
        # the measured step computes the model's own loss over the whole logits: so does this
        found = estimate(small_config(family), section, args.batch_size, args.seq_len, "fp32",
                         checkpointing, attention="cpu", chunked_loss=False)  # fmt: skip
        record(family, section, checkpointing, measured, found)
    batch_size, seq_len = (2, 16) if args.smoke else demo_step()
    for label, section in demo_methods()[: 1 if args.smoke else None]:
        batch = review_batch(batch_size, seq_len)
        measured = step_peak_bytes(minilm_model(section, batch), batch)
        found = estimate("minilm", section, batch_size, seq_len, "fp32", task="classification",
                         attention="cpu")  # fmt: skip
        record("minilm", section, False, measured, found, label=label, batch_size=batch_size,
               seq_len=seq_len)  # fmt: skip
    rows = [
        [r["family"], r.get("label", r["estimate"]["label"])
         + (", checkpointing" * r["gradient_checkpointing"]),
         f"{r['measured_peak_bytes'] / MIB:.2f} MiB", f"{r['estimated_peak_bytes'] / MIB:.2f} MiB",
         f"{r['ratio']:.3f}"]
        for r in results
    ]  # fmt: skip
    print(markdown_table(["model", "method", "measured peak", "estimate", "estimate / measured"],
                         rows))  # fmt: skip
    worst = max(abs(r["ratio"] - 1) for r in results)
    print(f"{len(results)} cases, every estimate within {100 * worst:.1f}% of its measured peak")
    args.note = ("tensor bytes from torch.profiler allocation events, which do not depend on "
                 "timing; the machine was shared by other jobs")  # fmt: skip
    print(f"wrote {write_json('estimate_accuracy', args, results, args.output)}")


if __name__ == "__main__":
    main()
