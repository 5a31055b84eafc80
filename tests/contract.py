"""The method contract every PEFT method is held to, on tiny random models of each family.

tests/test_contract.py holds the table of cases (one `Case` per method configuration); this module
holds what they share: the tiny models and their batches, a training loop that drives a method's
hooks in the order the peftkit pipeline does, and `run_case`, which trains one case on one family
once and records what the contract's checks look at."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import peftkit
from peftkit.method import TrainingHooks
from peftkit.models import load_model

# family -> the task type its tiny model is built for in the matrix
FAMILIES = {
    "bert": "classification",
    "t5": "seq2seq",
    "gpt2": "causal-lm",
    "llama": "causal-lm",
    "qwen2": "causal-lm",
}


def tiny(family: str, seed: int = 0, **storage: Any) -> tuple[torch.nn.Module, Any]:
    """The tiny model of a family, for its matrix task, always with the same random weights;
    `storage` (dtype, quantize) as load_model takes it."""
    model, tokenizer = load_model(f"tiny-{family}", FAMILIES[family], seed=seed, **storage)
    return model.eval(), tokenizer


def batch_for(family: str, tokenizer: Any) -> dict[str, torch.Tensor]:
    """A small padded batch with labels suitable for the family's task type."""
    texts = ["the cat sat on the mat", "a dog", "peft on tiny models"]
    encoded = dict(tokenizer(texts, return_tensors="pt", padding=True))
    task = FAMILIES[family]
    if task == "classification":
        encoded["labels"] = torch.tensor([0, 1, 1])
    elif task == "seq2seq":
        target = tokenizer(["cat", "dog", "peft"], return_tensors="pt", padding=True)
        encoded["labels"] = target["input_ids"].masked_fill(target["attention_mask"] == 0, -100)
    else:
        encoded["labels"] = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    return encoded


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eval-mode logits of a batch (labels included: seq2seq needs them for decoder inputs)."""
    return logits_and_loss(model, batch)[0]


def logits_and_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode logits and loss of a batch."""
    model.eval()
    with torch.no_grad():
        output = model(**batch)
    return output.logits, output.loss


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def prepare_method(model: torch.nn.Module, config: Any, batches: Sequence[Any]) -> TrainingHooks:
    """The applied method's hooks, after its prepare step (once, before any optimizer exists:
    Child-Tuning D chooses what trains here)."""
    hooks = peftkit.api.applied(model).method.training_hooks(model, config)
    if hooks.prepare is not None:
        hooks.prepare(model, batches)
    return hooks


def train_with_hooks(
    model: torch.nn.Module,
    hooks: TrainingHooks,
    batches: Sequence[dict[str, torch.Tensor]],
    steps: int,
    lr: float = 1e-2,
    after_step: Callable[[int], None] | None = None,
) -> torch.optim.Optimizer:
    """Train `steps` optimizer steps, calling the hooks where peftkit's pipeline calls them.

    The order (train.py's PeftkitTrainer and HooksCallback): AdamW over the trainable parameters;
    replace_optimizer; begin_training with the step budget; then per step the task loss plus
    extra_loss, backward, before_optimizer_step, optimizer.step(), after_optimizer_step (gradients
    still there, as AdaLoRA's allocation needs), zero the gradients. Steps count from 0, as the
    Trainer's global_step does when the step hooks run. `after_step(step)` runs last each step."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    if hooks.replace_optimizer is not None:
        optimizer = hooks.replace_optimizer(model, optimizer)
    if hooks.begin_training is not None:
        hooks.begin_training(model, steps)
    model.train()
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        if hooks.extra_loss is not None:
            loss = loss + hooks.extra_loss(model)
        loss.backward()
        if hooks.before_optimizer_step is not None:
            hooks.before_optimizer_step(model, step)
        optimizer.step()
        if hooks.after_optimizer_step is not None:
            hooks.after_optimizer_step(model, step)
        optimizer.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(step)
    model.eval()
    return optimizer


@dataclass(frozen=True)
class Case:
    """One row of the contract table: a method configuration and what it promises."""

    label: str
    config: Callable[[str], Any]  # family -> the method config to apply on that family
    # A regex every trainable parameter's name matches; None: every parameter trains.
    trainable: str | None
    unchanged_at_init: bool = True
    mergeable: bool = True
    # Files PEFT reads (peft.PeftModel.from_pretrained); else peftkit's own, which PEFT refuses.
    peft_loadable: bool = False
    # family -> why PEFT cannot load this case's files there (the check is left out for it).
    peft_excluded: dict[str, str] = field(default_factory=dict)
    # family -> why the method cannot serve that family at all: every check is left out, and
    # test_contract checks that applying it there is refused with a TargetError instead.
    excluded: dict[str, str] = field(default_factory=dict)
    # Why PEFT's loss on these files differs from peftkit's (the logits must still agree).
    peft_loss_differs: str | None = None
    # A regex of parameters a merged model may have that the base lacks (and why, at the row).
    merge_adds: str | None = None
    steps: int = 1
    # After training: whether the run reached what the case needs (ReLoRA: a restart).
    reached: Callable[[torch.nn.Module], bool] | None = None


@dataclass(frozen=True)
class Run:
    """What one case did on one family; the contract's checks assert on these."""

    batch: dict[str, torch.Tensor]
    base_names: list[str]  # parameters of the untouched base model
    reference: torch.Tensor  # the base model's logits
    names: list[str]  # parameters of the applied (and prepared) model
    trainable: list[str]
    at_init: torch.Tensor  # logits right after apply and prepare
    moved_by_first_step: list[str]  # parameters the first optimizer step changed
    tuned: torch.Tensor  # logits after training
    tuned_loss: torch.Tensor
    adapter: Path  # what peftkit.save wrote after training
    reached: bool | None


def run_case(case: Case, family: str, folder: Path, **storage: Any) -> Run:
    """Apply, prepare, train `case.steps` steps and save one case on one family, recording it;
    `storage` (dtype, quantize) says how the base is stored."""
    torch.manual_seed(0)  # the same run whichever test asks for it first
    base, tokenizer = tiny(family, **storage)
    batch = batch_for(family, tokenizer)
    base_names = [n for n, _ in base.named_parameters()]
    reference = logits(base, batch)
    config = case.config(family)
    model = peftkit.apply(base, config)
    hooks = prepare_method(model, config, [batch])
    names = [n for n, _ in model.named_parameters()]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    at_init = logits(model, batch)

    before = snapshot(model)
    moved: list[str] = []

    def record_first_step(step: int) -> None:
        if step == 0:
            after = snapshot(model)
            moved.extend(n for n in before if not torch.equal(before[n], after[n]))

    train_with_hooks(model, hooks, [batch], case.steps, after_step=record_first_step)
    tuned, tuned_loss = logits_and_loss(model, batch)
    peftkit.save(model, folder / "adapter")
    return Run(
        batch=batch,
        base_names=base_names,
        reference=reference,
        names=names,
        trainable=trainable,
        at_init=at_init,
        moved_by_first_step=moved,
        tuned=tuned,
        tuned_loss=tuned_loss,
        adapter=folder / "adapter",
        reached=case.reached(model) if case.reached is not None else None,
    )


def count_layer_runs(base: torch.nn.Module) -> tuple[list[int], int]:
    """A list that grows by one each time a transformer layer of `base` runs, a checkpointed
    layer's recompute in backward included, and the number of layers. transformers checkpoints a
    layer's forward, not its call, so a hook on the layer itself runs once; the layer's first
    norm is called again when backward recomputes it."""
    from peftkit.memory.activations import transformer_layers

    runs: list[int] = []
    layers = transformer_layers(base)
    for layer in layers:
        first = next(m for m in layer.modules() if "norm" in type(m).__name__.lower())
        first.register_forward_pre_hook(lambda *_: runs.append(1))
    return runs, len(layers)
