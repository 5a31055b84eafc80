"""peftkit's fast LoRA/DoRA forward under torch.compile (issue 33 item 3): dynamo traces a training
forward of tiny-llama as one graph with no break, and the compiled model (aot_eager backend: the
traced graph run by torch's own kernels, no inductor build) computes PEFT's losses and gradients
over two updated steps."""

import copy

import peft
import pytest
import torch
import torch._dynamo

import peftkit
from contract import batch_for, tiny
from peftkit.methods import lora


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test traces from scratch and leaves no compiled code behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("config_type", [peftkit.LoraConfig, peftkit.DoraConfig])
def test_fast_path_training_forward_is_one_graph(config_type):
    """With dropout (mask draws, shared q/k/v and gate/up sibling results, DoRA's weight norm),
    one graph and no break; before issue 33 LoRA broke 45 times here and DoRA 46."""
    base, tokenizer = tiny("llama")
    model = peftkit.apply(base, config_type(target_modules="all-linear", dropout=0.1)).train()
    batch = batch_for("llama", tokenizer)
    model(**batch)  # eager: the fast path finds its sibling layers on the first forward
    explained = torch._dynamo.explain(lambda: model(**batch).loss)()
    reasons = [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert (explained.graph_count, explained.graph_break_count, reasons) == (1, 0, [])


@pytest.mark.parametrize("config_type", [peftkit.LoraConfig, peftkit.DoraConfig])
def test_compiled_fast_path_matches_peft_over_updates(config_type):
    """Compiled from the first forward (the sibling discovery included), dropout 0: PEFT's eager
    losses and gradients at each of three steps with an SGD update between (DoRA's norm must follow
    the updated weights)."""
    base, tokenizer = tiny("llama")
    config = config_type(rank=4, target_modules="all-linear", dropout=0.0)
    fast = peftkit.apply(copy.deepcopy(base), config).train()
    reference = peft.get_peft_model(base, lora.peft_config(base, config)).train()
    torch.manual_seed(1)
    with torch.no_grad():
        for (name, mine), (_, theirs) in zip(
            fast.named_parameters(), reference.named_parameters(), strict=True
        ):
            if "lora_B" in name:
                theirs.normal_(std=0.3)
            mine.copy_(theirs)
    compiled = torch.compile(fast, backend="aot_eager")
    batch = batch_for("llama", tokenizer)
    pairs = [
        (p, q) for p, q in zip(fast.parameters(), reference.parameters(), strict=True)
        if p.requires_grad
    ]  # fmt: skip
    for _ in range(3):
        got, want = compiled(**batch).loss, reference(**batch).loss
        got.backward()
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            for mine, theirs in pairs:
                torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-5)
                mine -= 0.1 * mine.grad
                theirs -= 0.1 * theirs.grad
                mine.grad = theirs.grad = None
