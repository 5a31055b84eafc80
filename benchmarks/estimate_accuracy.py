"""The memory estimator against the measured peak of real training steps: each method applied by
peftkit.apply to a small random model on the CPU (its prepare hook run on real batches), one
AdamW step measured by torch.profiler's allocation events (peftkit.memory.step_peak), and the
estimate for the same model, method, batch and dtype.

Shapes: a Llama-style and a GPT-2-style causal LM, hidden 256, 4 layers, 4 heads, vocabulary
2000, batch 4 x 128 tokens, fp32, so that activations are a large share of the peak. The
measurement counts tensors only, as the estimate does, and repeats to the byte.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/estimate_accuracy.py
"""

from __future__ import annotations

from typing import Any

from common import base_parser, markdown_table, setup, write_json

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

    import peftkit
    from peftkit.api import applied

    torch.manual_seed(0)
    config = small_config(family)
    config._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    options = dict(section)
    tuned = peftkit.apply(model, options.pop("name"), **options)
    state = applied(tuned)
    prepare = state.method.training_hooks(tuned, state.config).prepare
    if prepare is not None:
        prepare(tuned, [causal_batch(2, 32)])
    return tuned


def main() -> None:
    """Measure every case, print the table, write the JSON."""
    parser = base_parser(__doc__.split("\n\n")[0], "small")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    setup(args)
    from peftkit.memory.estimate import estimate
    from peftkit.memory.step_peak import step_peak_bytes

    results = []
    for family, section, checkpointing in CASES:
        model = real_model(family, section, checkpointing)
        measured = step_peak_bytes(model, causal_batch(args.batch_size, args.seq_len))
        found = estimate(small_config(family), section, args.batch_size, args.seq_len, "fp32",
                         checkpointing)  # fmt: skip
        results.append({
            "family": family, "method": section, "gradient_checkpointing": checkpointing,
            "trainable_parameters": found.trainable_parameters,
            "measured_peak_bytes": measured, "estimated_peak_bytes": int(found.total),
            "ratio": found.total / measured, "estimate": found.as_dict(),
        })  # fmt: skip
    rows = [
        [r["family"], r["estimate"]["label"] + (", checkpointing" * r["gradient_checkpointing"]),
         f"{r['measured_peak_bytes'] / MIB:.2f} MiB", f"{r['estimated_peak_bytes'] / MIB:.2f} MiB",
         f"{r['ratio']:.3f}"]
        for r in results
    ]  # fmt: skip
    print(markdown_table(["model", "method", "measured peak", "estimate", "estimate / measured"],
                         rows))  # fmt: skip
    print(f"wrote {write_json('estimate_accuracy', args, results, args.output)}")


if __name__ == "__main__":
    main()
