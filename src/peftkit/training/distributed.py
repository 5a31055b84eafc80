"""Several processes (`torchrun`, `accelerate launch`): what peftkit adds to transformers.Trainer's
own DDP, FSDP and DeepSpeed handling. Every process trains its share of each global batch; the
main process alone evaluates, saves and reports; all of them end together."""

from __future__ import annotations

import gc
import os
from typing import TYPE_CHECKING, Any

import torch

import peftkit.api as api
from peftkit.errors import ConfigError
from peftkit.method import TrainingHooks
from peftkit.models import load_model

if TYPE_CHECKING:
    from peftkit.recipe import Recipe

# What `accelerate launch` sets for a sharded run (and the name the refusal message uses).
SHARDING_VARIABLES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed ZeRO"}


def distributed() -> bool:
    """True inside a process group of more than one process (torchrun, accelerate launch)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """Whether this process reports and saves (RANK is set by torchrun and accelerate launch)."""
    return os.environ.get("RANK", "0") == "0"


def wait_for_everyone() -> None:
    """A barrier across processes; nothing in a single process."""
    if distributed():
        torch.distributed.barrier()


def finish_distributed() -> None:
    """Wait for every process, then tear the process group down. A process that left with its
    group still up (the non-main ones return as soon as training ends) could abort at exit
    ("terminate called without an active exception" from the gloo threads), failing the run."""
    if distributed():
        # The trainer is in reference cycles (its callbacks hold it), so the DDP wrapper and its
        # reducer, which hold the group too, would otherwise outlive destroy_process_group and be
        # torn down at interpreter exit (a rarer abort, about one CI run in four, was still seen).
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def share_random_state() -> None:
    """Give every process the main process's random state, so hooks that draw random numbers
    draw the same ones everywhere and the replicas stay equal."""
    if distributed():
        from accelerate.utils import synchronize_rng_states

        synchronize_rng_states(["torch", "cuda"] if torch.cuda.is_available() else ["torch"])


def sharding_backend() -> str | None:
    """'FSDP' or 'DeepSpeed ZeRO' when `accelerate launch` set one up, else None."""
    found = (name for var, name in SHARDING_VARIABLES.items() if os.environ.get(var) == "true")
    return next(found, None)


def parameters_sharded() -> bool:
    """FSDP and ZeRO-3 keep only a shard of each weight on a process (ZeRO-1/2 keep them whole)."""
    zero_stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return sharding_backend() == "FSDP" or (sharding_backend() is not None and zero_stage == "3")


def refuse_unsupported_sharding(
    method_name: str, hooks: TrainingHooks, recipe: Recipe, resume: Any
) -> None:
    """FSDP and DeepSpeed ZeRO shard weights, gradients and the optimizer step across processes:
    a method whose hooks read or rewrite whole weights or gradients cannot run under them, and
    peftkit's checkpoints need whole weights on the main process."""
    backend = sharding_backend()
    if backend is None:
        return
    names = ("prepare", "before_optimizer_step", "after_optimizer_step", "replace_optimizer")
    used = [name for name in names if getattr(hooks, name) is not None]
    if used:
        raise ConfigError(
            f"Method '{method_name}' cannot train under {backend}: its {', '.join(used)} hook(s) "
            f"read or change whole weights and gradients, which {backend} shards across "
            "processes. Launch it with plain DDP instead (torchrun, or accelerate launch with "
            "distributed_type: MULTI_GPU / MULTI_CPU); docs/distributed.md lists what each "
            "backend supports."
        )
    if parameters_sharded() and (recipe.training.save_steps > 0 or resume):
        raise ConfigError(
            "Checkpoints and --resume are not supported where weights are sharded (FSDP, "
            "DeepSpeed ZeRO-3): set training.save_steps: 0, or use DDP or ZeRO-1/2."
        )


def gathered_model(trainer: Any, recipe: Recipe, config: Any) -> Any:
    """The trained model, whole, on the main process (None elsewhere). Under FSDP or ZeRO-3 every
    process joins accelerate's gather and the main one rebuilds the model from it: methods
    allowed there have no prepare hook, so apply() gives the same structure again."""
    if not parameters_sharded():
        return trainer.model if trainer.is_world_process_zero() else None
    engine = trainer.deepspeed if trainer.is_deepspeed_enabled else trainer.model_wrapped
    state = trainer.accelerator.get_state_dict(engine)  # a collective: every process calls it
    if not trainer.is_world_process_zero():
        return None
    base, _ = load_model(recipe.model, recipe.task.type, num_labels=trainer.model.config.num_labels)
    rebuilt = api.apply(base, config)
    rebuilt.load_state_dict(state)
    return rebuilt


def check_processes_agree(model: Any) -> None:
    """Refuse to train when processes prepared different adapters: DDP would average unrelated
    weights. Compares each saved tensor's shape and sum across processes."""
    if not distributed():
        return
    tensors = api.applied(model).method.state_dict(model)
    fingerprint = [(k, tuple(v.shape), float(v.double().sum())) for k, v in sorted(tensors.items())]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, fingerprint)
    if any(other != gathered[0] for other in gathered):
        raise ConfigError(
            "The processes prepared different adapters (the method's prepare step saw different "
            "data or random numbers on each). Give every process the same data and seed."
        )
