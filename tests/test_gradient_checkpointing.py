"""Gradient checkpointing for every registered method (the contract table's rows) on every tiny
family, prompt and prefix tuning included: the gradients with and without it are equal, and the
layers really ran twice (checkpointing was on, not silently skipped)."""

from __future__ import annotations

import pytest
import torch
from test_contract import CASES

import peftkit
from contract import FAMILIES, batch_for, prepare_method, tiny
from peftkit.errors import ConfigError
from peftkit.memory.activations import transformer_layers
from peftkit.training.gradient_checkpointing import enable_gradient_checkpointing

ROWS = [
    pytest.param(case, family, id=f"{case.label}-{family}")
    for case in CASES
    for family in FAMILIES
    if family not in case.excluded  # a family the method refuses (test_contract checks that)
]


def gradients(case, family: str, checkpointing: bool) -> tuple[dict, int, int]:  # noqa: ANN001
    """The trainable parameters' gradients after one loss, how many layer calls the pass made,
    and how many layers the model has."""
    torch.manual_seed(0)
    base, tokenizer = tiny(family)
    batch = batch_for(family, tokenizer)
    if checkpointing:
        enable_gradient_checkpointing(base)
    layers = transformer_layers(base)
    calls = []
    for layer in layers:
        # transformers checkpoints a layer's forward, not its call, so hooks on the layer itself
        # run once; its first norm is called again when the backward pass recomputes it (a
        # norm: LoRA's fast path calls an adapted linear's weight, not the module).
        first = next(m for m in layer.modules() if "norm" in type(m).__name__.lower())
        first.register_forward_pre_hook(lambda *_: calls.append(1))
    config = case.config(family)
    model = peftkit.apply(base, config)
    hooks = prepare_method(model, config, [batch])
    calls.clear()
    model.train()
    torch.manual_seed(1)  # the same dropout masks in both passes
    loss = model(**batch).loss
    if hooks.extra_loss is not None:
        loss = loss + hooks.extra_loss(model)
    loss.backward()
    found = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return found, len(calls), len(layers)


@pytest.mark.parametrize(("case", "family"), ROWS)
def test_gradients_equal_with_and_without_checkpointing(case, family):
    plain, plain_calls, layers = gradients(case, family, checkpointing=False)
    checked, checked_calls, _ = gradients(case, family, checkpointing=True)
    assert plain_calls == layers and checked_calls == 2 * layers, "checkpointing did not run"
    assert plain.keys() == checked.keys()
    assert any(g is not None and g.abs().max() > 0 for g in plain.values())
    for name, grad in plain.items():
        if grad is None:
            assert checked[name] is None, name
            continue
        torch.testing.assert_close(checked[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_a_model_without_checkpointing_support_is_refused():
    with pytest.raises(ConfigError, match="does not support gradient checkpointing"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))
