"""Checkpoints that appear only when complete, and finding the one to resume from.

Trainer writes each checkpoint (the peftkit adapter, optimizer, scheduler, RNG state, trainer
state) into `checkpoints/.incomplete/checkpoint-N`; the callback below adds the method's own state
and renames the folder into `checkpoints/`. A crash mid-save leaves the earlier checkpoints as
they were, and `get_last_checkpoint` never sees a half-written one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from peftkit import io
from peftkit.errors import ConfigError
from peftkit.method import TrainingHooks
from peftkit.training.distributed import wait_for_everyone

CHECKPOINTS = "checkpoints"
STAGING = ".incomplete"  # checkpoints are built here and renamed into place once complete
METHOD_STATE_NAME = "method_state.pt"


def staging_root(output: Path) -> Path:
    """Where Trainer writes checkpoints (its output_dir) before they are published."""
    return output / CHECKPOINTS / STAGING


def _fsync_tree(folder: Path) -> None:
    """Flush a folder's files to disk, so the rename publishes complete files."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def publish(staging: Path, final: Path) -> None:
    """Rename a complete checkpoint into place (replacing one of the same step, from a run that
    went past it before being resumed from an earlier one)."""
    _fsync_tree(staging)
    io.replace_folder(staging, final, keep_extra=False)


class CheckpointCallback(TrainerCallback):
    """Clears what a crashed save left in the staging folder, then publishes each checkpoint
    Trainer completes there, with the method's state added."""

    def __init__(self, output: Path, hooks: TrainingHooks, model: Any) -> None:
        self.output = output
        self.hooks = hooks
        self.model = model

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        """A leftover from a save that crashed is never published: remove it."""
        if args.should_save:
            shutil.rmtree(staging_root(self.output), ignore_errors=True)
        wait_for_everyone()

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
        """Trainer has written checkpoint-N into staging on every process: publish it."""
        name = f"checkpoint-{state.global_step}"
        staging = staging_root(self.output) / name
        if args.should_save and self.hooks.state is not None:
            torch.save(self.hooks.state(self.model), staging / METHOD_STATE_NAME)
        wait_for_everyone()  # every process has written its RNG state
        if args.should_save:
            publish(staging, self.output / CHECKPOINTS / name)
            # Trainer rotates its own output_dir, the staging folder, which holds one checkpoint
            # at a time: the limit is kept here, over the published ones, by step.
            rotate_checkpoints(str(self.output / CHECKPOINTS), args.save_total_limit)
        wait_for_everyone()


def find_checkpoint(output: Path, resume: str | bool) -> Path:
    """The checkpoint to resume from: the newest complete one in the run folder, or a given one."""
    if resume is True or resume == "latest":
        folder = output / CHECKPOINTS
        found = get_last_checkpoint(str(folder)) if folder.is_dir() else None
        if found is None:
            raise ConfigError(
                f"Nothing to resume: no complete checkpoint in {folder}. Checkpoints are written "
                "every training.save_steps steps (set it above 0), or pass --resume PATH."
            )
        return Path(found)
    path = Path(resume)
    if not (path / "trainer_state.json").is_file() or not (path / io.CONFIG_NAME).is_file():
        raise ConfigError(
            f"{path} is not a complete peftkit checkpoint (it needs trainer_state.json and "
            f"{io.CONFIG_NAME}); pass a checkpoint-N folder from a run's {CHECKPOINTS}/ folder."
        )
    return path


def method_state(checkpoint: Path | None) -> dict[str, Any] | None:
    """The method's state saved in a checkpoint, if it has one."""
    if checkpoint is None or not (checkpoint / METHOD_STATE_NAME).is_file():
        return None
    return torch.load(checkpoint / METHOD_STATE_NAME, weights_only=True)
