"""A finished run's summary as the table `peftkit train` prints."""

from __future__ import annotations

from typing import Any

from peftkit.tables import key_value_table


def format_summary(summary: dict[str, Any]) -> str:
    """The run's summary as an aligned two-column table."""
    metric = summary["metric"]
    rows = [
        ("method", summary["method"]),
        ("model", summary["model"]),
        (
            "trainable params",
            f"{summary['trainable_parameters']:,} ({summary['trainable_percent']:.3f}%)",
        ),
        ("peak memory (process)", f"{summary['peak_memory_mib']:.0f} MiB"),
        (
            "training memory",
            f"{summary['training_memory_mib']:.0f} MiB"
            + (
                f" (estimate {summary['estimated_training_memory_mib']:.0f})"
                if summary.get("estimated_training_memory_mib") is not None
                else ""
            ),
        ),
        ("optimizer state", f"{summary['optimizer_state_mib']:.2f} MiB"),
        ("tokens/s (train)", f"{summary['tokens_per_second']:.0f}"),
        ("train time", f"{summary['train_seconds']:.1f} s ({summary['steps']} steps)"),
        (f"{metric} before", f"{summary['metric_before']:.4f}"),
        (f"{metric} after", f"{summary['metric_after']:.4f}"),
    ]
    if "majority_baseline" in summary["eval_after"]:
        rows.append(("majority baseline", f"{summary['eval_after']['majority_baseline']:.4f}"))
    rows.append(("adapter size", f"{summary['adapter_bytes'] / 1024:.1f} KiB"))
    if summary["truncated_examples"]:
        rows.append(("truncated examples", str(summary["truncated_examples"])))
    if summary["dropped_examples"]:
        rows.append(("dropped (train)", f"{summary['dropped_examples']} (nothing to learn)"))
    if summary.get("dropped_eval_examples"):
        rows.append(("dropped (held-out)", f"{summary['dropped_eval_examples']} (empty input)"))
    return key_value_table(rows)
