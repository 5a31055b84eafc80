"""The method contract every PEFT method is held to, on tiny random models of each family.

A method's test file calls `check_contract` with its own config; the checks are the same for all:
only the intended parameters train, output is unchanged at initialisation (where promised), one
optimizer step changes only them, save then load reproduces the outputs, merged equals unmerged."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import peftkit
from peftkit.models import load_model

# family -> the task type its tiny model is built for in the matrix
FAMILIES = {
    "bert": "classification",
    "t5": "seq2seq",
    "gpt2": "causal-lm",
    "llama": "causal-lm",
    "qwen2": "causal-lm",
}


def tiny(family: str, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """The tiny model of a family, for its matrix task, always with the same random weights."""
    model, tokenizer = load_model(f"tiny-{family}", FAMILIES[family], seed=seed)
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
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def check_contract(
    family: str,
    config: Any,
    tmp_path: Path,
    trainable: str | None,
    unchanged_at_init: bool = True,
    mergeable: bool = True,
    lr: float = 1e-2,
    atol: float = 1e-5,
) -> None:
    """Run every contract check for one method config on one tiny family.

    `trainable`: a regex every trainable parameter name must match (None skips that check)."""
    base, tokenizer = tiny(family)
    batch = batch_for(family, tokenizer)
    reference = logits(base, batch)
    model = peftkit.apply(base, config)
    hooks = peftkit.api.applied(model).method.hooks(model, config)
    if hooks.prepare:  # data-driven methods (Child-Tuning D) choose what trains here
        hooks.prepare(model, [batch])

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names, "the method made nothing trainable"
    if trainable is not None:
        wrong = [n for n in names if not re.search(trainable, n)]
        assert not wrong, f"unintended trainable parameters: {wrong[:5]}"

    if unchanged_at_init:
        torch.testing.assert_close(logits(model, batch), reference, atol=atol, rtol=0)

    before = snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    if hooks.replace_optimizer:  # as the pipeline does (Child-Tuning F masks inside the step)
        optimizer = hooks.replace_optimizer(model, optimizer)
    model.train()
    model(**batch).loss.backward()
    if hooks.before_optimizer_step:
        hooks.before_optimizer_step(model, 0)
    optimizer.step()
    if hooks.after_optimizer_step:
        hooks.after_optimizer_step(model, 0)
    after = snapshot(model)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    frozen_moved = [n for n in frozen if not torch.equal(before[n], after[n])]
    assert not frozen_moved, f"frozen parameters changed: {frozen_moved[:5]}"
    assert any(not torch.equal(before[n], after[n]) for n in names), "the step changed nothing"

    tuned = logits(model, batch)
    assert not torch.allclose(tuned, reference), "training did not change the output"
    peftkit.save(model, tmp_path / "adapter")
    fresh, _ = tiny(family)
    loaded = peftkit.load(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, batch), tuned, atol=atol, rtol=0)

    if mergeable:
        merged = peftkit.merge(loaded)
        assert not any("lora" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(logits(merged, batch), tuned, atol=1e-4, rtol=1e-4)


def make_configs(factory: Callable[[str], Any]) -> list[tuple[str, Any]]:
    """(family, config) pairs for a parametrised matrix over all five families."""
    return [(family, factory(family)) for family in FAMILIES]
