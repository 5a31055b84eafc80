"""Checkpoints of a sharded run (`training.sharding: fsdp` with `training.save_steps`), written
and read with torch.distributed.checkpoint (DCP).

A sharded checkpoint-N holds what a DDP one holds, in the same places, except the optimizer:

- the adapter in the method's (PEFT's) files, gathered whole: every process joins the gather of
  each trained tensor, the main process writes them. A checkpoint is an adapter like any other,
  and `--resume` rebuilds the model from it before sharding, as an unsharded resume does;
- `sharded/`: the trained tensors and the optimizer state as each process holds them (its
  shard), one file per process and DCP's `.metadata`, written by every process at once; nothing
  is gathered. `--resume` loads them into the sharded model and its optimizer, each process its
  own part, so the optimizer state never exists whole anywhere;
- `scheduler.pt`, `trainer_state.json` (main process), `rng_state_<rank>.pth` (each process).

The checkpoint is built in the staging folder and published by CheckpointCallback once every
process has written its part (checkpoints.py): a process killed mid-save leaves the earlier
checkpoints as they were. Every process writes into the run folder, so on several machines the
run's output_dir must be on a filesystem they share (as for a DDP run's RNG states)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers.trainer import SCHEDULER_NAME

import peftkit.api as api
from peftkit import io
from peftkit.errors import ConfigError
from peftkit.method import adapter_files
from peftkit.training.trainer import PeftkitTrainer

SHARDED_FOLDER = "sharded"  # DCP's files inside checkpoint-N


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor whole on the CPU: a DTensor gathered from every process (a collective), another
    tensor as it is."""
    from torch.distributed.tensor import DTensor

    value = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return value.detach().cpu()


def save_gathered_adapter(model: Any, folder: str | Path, main: bool) -> None:
    """The sharded model's adapter in the method's files, in `folder`: every process gathers
    each saved tensor whole, in the same order; the main process alone keeps and writes them."""
    files = adapter_files(model)
    tensors = {}
    for name, tensor in files[io.WEIGHTS_NAME].items():
        gathered = whole(tensor)
        if main:
            tensors[name] = gathered
    if not main:
        return
    files[io.WEIGHTS_NAME] = tensors
    api.refuse_non_finite(tensors, folder)
    io.write_folder_atomically(folder, files)


def _state_options() -> Any:
    """Only the trained tensors: the frozen base is the one the run loads again. (Loading is
    not strict about the frozen ones it leaves out; dcp.load refuses a trained tensor the
    checkpoint lacks.)"""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def save_shards(model: Any, optimizer: torch.optim.Optimizer, checkpoint: str | Path) -> None:
    """Every process writes its shard of the trained tensors and of the optimizer state into
    checkpoint/sharded (a collective: every process calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=_state_options())
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.save(state, checkpoint_id=str(Path(checkpoint) / SHARDED_FOLDER))


def load_shards(model: Any, optimizer: torch.optim.Optimizer, checkpoint: str | Path) -> None:
    """Every process reads its shard of the trained tensors and of the optimizer state from
    checkpoint/sharded into the sharded model and its optimizer (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(checkpoint) / SHARDED_FOLDER
    options = _state_options()
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=options,
    )


def check_resume_sharding(checkpoint: Path | None, sharded: bool) -> None:
    """Refuse to resume a checkpoint with other sharding than wrote it: a sharded checkpoint
    holds its optimizer state as DCP shards, which an unsharded run would not find (it would
    go on with a fresh optimizer and schedule), and a DDP one holds it whole."""
    if checkpoint is None:
        return
    written_sharded = (checkpoint / SHARDED_FOLDER).is_dir()
    if written_sharded and not sharded:
        raise ConfigError(
            f"{checkpoint} was written by a sharded run (training.sharding: fsdp; its optimizer "
            f"state is in {SHARDED_FOLDER}/): resume it with training.sharding: fsdp under "
            "torchrun (any number of processes), or start a new run."
        )
    if sharded and not written_sharded:
        raise ConfigError(
            f"{checkpoint} was written by an unsharded run (its optimizer state is whole, in "
            "optimizer.pt): resume it with training.sharding: none, or start a new run."
        )


class ShardedTrainer(PeftkitTrainer):
    """PeftkitTrainer for a model sharded by training.sharding: fsdp: its checkpoints hold the
    gathered adapter and DCP's per-process shards of the trained tensors and optimizer state.

    transformers refuses checkpoints for a model that owns its sharding unless told to save
    the model only (its own would hold the main process's shard of the optimizer alone), so
    Trainer is told exactly that, and the model part of each checkpoint, below, writes the
    rest: the shards, the learning-rate schedule, every process's random state. Reading them
    back goes through Trainer's resume as usual, with the optimizer's part replaced."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["args"].save_only_model = True
        super().__init__(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The adapter, gathered whole (every process joins; the main process writes); inside
        a checkpoint, also the optimizer's shards, the schedule and the random states."""
        folder = output_dir or self.args.output_dir
        save_gathered_adapter(self.model, folder, self.args.should_save)
        if not _internal_call:
            return
        save_shards(self.model, self.optimizer, folder)
        if self.args.should_save:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's note on saving a scheduler
                with io.atomic_file(os.path.join(folder, SCHEDULER_NAME)) as staging:
                    torch.save(self.lr_scheduler.state_dict(), staging)
        self._save_rng_state(folder)

    # Private override: Trainer reads `optimizer.pt` whole into every process.

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Every process reads its shards back (DCP), then the learning-rate schedule."""
        if checkpoint is None:
            return
        load_shards(self.model, self.optimizer, checkpoint)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            schedule = torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True)
        self.lr_scheduler.load_state_dict(schedule)
