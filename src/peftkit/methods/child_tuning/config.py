"""Child-Tuning's options (child_tuning.py has the method): the mode, the share p of weights
updated, the Fisher pass's size, and the layout save records for load."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftkit.errors import ConfigError

MODES = ("D", "F")


@dataclass(frozen=True)
class ChildTuningConfig:
    """Update only a child network: a random one each step (F) or a Fisher-chosen one (D)."""

    mode: str = field(
        default="D",
        metadata={"help": "'D' (task-driven: Fisher-chosen fixed subnetwork) or 'F' (task-free)"},
    )
    reserve_ratio: float = field(
        default=0.3,
        metadata={"help": "p: share of weights updated (F: per step, D: the fixed subnetwork)"},
    )
    fisher_batches: int | None = field(
        default=None,
        metadata={"help": "D: task batches in the Fisher pass (default: every batch given)"},
    )
    saved_layout: dict[str, int] | None = field(
        default=None,
        metadata={
            "help": "written by save: changed entries per tensor, so load can build the right "
            "shapes; leave unset when training"
        },
    )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"Child-Tuning mode must be 'D' or 'F', got {self.mode!r}.")
        if not 0.0 < self.reserve_ratio <= 1.0:
            raise ConfigError(
                f"reserve_ratio must be in (0, 1] (the paper uses 0.3), got {self.reserve_ratio}."
            )
        if self.fisher_batches is not None and self.fisher_batches < 1:
            raise ConfigError(
                f"fisher_batches must be at least 1 (or unset for all), got {self.fisher_batches}."
            )
