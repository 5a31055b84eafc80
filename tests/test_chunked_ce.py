"""The chunked LM-head cross-entropy (models/chunked_loss.py) against transformers' own causal-LM
loss: equal loss and gradients through PeftkitTrainer.compute_loss (full fine-tuning with tied
embeddings, LoRA, Gemma 2's logit soft-capping), the whole batch's logits never allocated, and the
plain loss kept, by name, where the head or the logits cannot be followed."""

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.profiler import ProfilerActivity, profile
from transformers import Trainer, TrainingArguments

import peftkit
from peftkit.models import chunked_loss
from peftkit.training.trainer import PeftkitTrainer

TOLERANCE = 1e-5


def _llama(tied: bool = True, vocab: int = 300) -> torch.nn.Module:
    """A tiny Llama (hidden 32, 2 layers), seeded, with tied embeddings like SmolLM2's."""
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        initializer_range=0.2,
        pad_token_id=0,
    )
    return _seeded(transformers.LlamaForCausalLM, config)


def _seeded(model_class: type, config: object) -> torch.nn.Module:
    """A model built from a config with the same random weights every time."""
    state = torch.get_rng_state()
    torch.manual_seed(0)
    try:
        return model_class(config).train()
    finally:
        torch.set_rng_state(state)


def _batch(vocab: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Two rows, the second padded, prompts masked with -100; and transformers' label count."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, vocab, (2, 40), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 30:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100  # the prompt
    count = (labels[:, 1:] != -100).sum()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}, count


def _trainer(model: torch.nn.Module, tmp_path, **kwargs) -> PeftkitTrainer:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    return PeftkitTrainer(model=model, args=args, **kwargs)


def _loss_and_grads(loss_of, model) -> tuple[float, dict[str, torch.Tensor]]:
    """A loss and the gradients of the trainable parameters it gives."""
    model.zero_grad(set_to_none=True)
    loss = loss_of()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def _compare(model: torch.nn.Module, tmp_path, count_items: bool = True) -> PeftkitTrainer:
    """PeftkitTrainer's loss (chunked, 4 rows a chunk) against transformers Trainer's own on the
    same model: loss and every trainable gradient within TOLERANCE."""
    trainer = _trainer(model, tmp_path)
    batch, count = _batch(model.config.vocab_size)
    items = count if count_items else None
    plain = _loss_and_grads(
        lambda: Trainer.compute_loss(trainer, model, dict(batch), False, items), model
    )
    chunked = _loss_and_grads(lambda: trainer.compute_loss(model, dict(batch), False, items), model)
    assert trainer.chunked_loss_refused is None
    assert chunked[0] == pytest.approx(plain[0], abs=TOLERANCE)
    assert chunked[1].keys() == plain[1].keys()
    for name, grad in plain[1].items():
        torch.testing.assert_close(chunked[1][name], grad, atol=TOLERANCE, rtol=0, msg=name)
    return trainer


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 4 rows at a 300-token vocabulary: several chunks, one of them partial."""
    monkeypatch.setattr(chunked_loss, "CHUNK_ELEMENTS", 4 * 300)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_function_matches_closed_form(softcap):
    """Loss and gradients of hidden, weight and bias against autograd through F.cross_entropy."""
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(37, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    bias = torch.randn(50, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=generator)
    logits = F.linear(hidden, weight, bias)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    reference = F.cross_entropy(logits, targets, reduction="sum") / 29
    expected = torch.autograd.grad(reference * 0.5, (hidden, weight, bias))
    loss = chunked_loss.linear_cross_entropy(hidden, weight, bias, targets, 29, softcap, rows=6)
    got = torch.autograd.grad(loss * 0.5, (hidden, weight, bias))
    assert loss.item() == pytest.approx(reference.item(), abs=TOLERANCE)
    for mine, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, theirs, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("count_items", [True, False])
def test_full_fine_tuning_tied_embeddings(tmp_path, small_chunks, count_items):
    """Every parameter trains, the head's weight is the embedding's: its gradient sums both
    uses. With Trainer's label count (sum / count) and without (the mean)."""
    model = _llama(tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _compare(model, tmp_path, count_items)


def test_lora_never_holds_the_whole_logits(tmp_path, small_chunks):
    """LoRA on every linear layer: equal to transformers' loss, and no allocation of the batch's
    logits' size in the chunked forward and backward (the plain path makes several)."""
    model = peftkit.apply(_llama(tied=True), peftkit.LoraConfig(rank=4, dropout=0.0))
    with torch.no_grad():  # B non-zero, so that the adapters' gradients are not trivially zero
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.3, generator=torch.Generator().manual_seed(3))
    trainer = _compare(model, tmp_path)
    batch, count = _batch(model.config.vocab_size)
    logits_bytes = batch["input_ids"].numel() * model.config.vocab_size * 4

    def largest_allocation(loss_of) -> int:
        """The largest single allocation (bytes) in the loss's forward and backward."""
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            loss_of().backward()
        model.zero_grad(set_to_none=True)
        events = profiler.profiler.kineto_results.events()
        return max(e.nbytes() for e in events if e.name() == "[memory]")

    plain = largest_allocation(
        lambda: Trainer.compute_loss(trainer, model, dict(batch), False, count)
    )
    chunked = largest_allocation(lambda: trainer.compute_loss(model, dict(batch), False, count))
    assert plain >= logits_bytes
    # The largest is the head's weight (300 x 32 floats, a packed copy for the multiply), well
    # under the 80 x 300 logits.
    assert chunked <= logits_bytes / 2


def test_gemma2_logit_softcapping_is_honoured(tmp_path, small_chunks):
    """Gemma 2 caps its logits (final_logit_softcapping): the chunked loss applies the same cap."""
    config = transformers.Gemma2Config(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        final_logit_softcapping=2.0,
        initializer_range=0.2,
        pad_token_id=0,
    )
    model = _seeded(transformers.Gemma2ForCausalLM, config)
    assert chunked_loss.find_head(model)[0].softcap == 2.0
    _compare(model, tmp_path)


def test_adapted_head_keeps_the_plain_loss(tmp_path, capsys):
    """A LoRA on lm_head: the head computes through its adapter, so the chunked loss steps aside,
    naming the layer, and the loss is transformers' own."""
    base = _llama(tied=False)
    config = peftkit.LoraConfig(rank=4, dropout=0.0, target_modules=["q_proj", "lm_head"])
    model = peftkit.apply(copy.deepcopy(base), config)
    trainer = _trainer(model, tmp_path)
    batch, count = _batch(300)
    loss = trainer.compute_loss(model, dict(batch), False, count)
    assert "lm_head" in trainer.chunked_loss_refused
    assert "lm_head" in capsys.readouterr().out
    plain = Trainer.compute_loss(trainer, model, dict(batch), False, count)
    assert loss.item() == pytest.approx(plain.item(), abs=TOLERANCE)


def test_scaled_logits_are_refused_by_name():
    """Granite divides its logits by logits_scaling: not followed, said by the attribute's name."""
    config = transformers.GraniteConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        logits_scaling=4.0,
    )
    head, why = chunked_loss.find_head(_seeded(transformers.GraniteForCausalLM, config))
    assert head is None
    assert "logits_scaling=4.0" in why


def test_evaluation_and_outputs_take_the_plain_path(tmp_path):
    """In eval mode, or when the outputs are wanted, the model's own loss and logits are used."""
    model = _llama().eval()
    trainer = _trainer(model, tmp_path)
    batch, _ = _batch(300)
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(model, dict(batch), True)
        assert outputs.logits.shape == (2, 40, 300)
        assert float(loss) == pytest.approx(float(model(**batch).loss), abs=TOLERANCE)
    assert trainer.chunked_loss_refused is None


def test_logits_changed_after_the_head_fall_back_with_the_same_draws(tmp_path, capsys):
    """Prompt tuning's hooks cut the virtual positions off the logits (the stand-in is not
    returned): the step's loss is transformers' own, from the random state it started with (a
    hook adds random noise in the first layer: the plain forward must draw what the thrown-away
    one drew)."""
    base = _llama()
    base.model.layers[0].mlp.register_forward_hook(
        lambda module, args, output: output + 0.5 * torch.randn_like(output)
    )
    model = peftkit.apply(base, peftkit.PromptTuningConfig(num_virtual_tokens=3))
    trainer = _trainer(model, tmp_path)
    batch, count = _batch(300)
    with torch.random.fork_rng():
        start = torch.get_rng_state()
        loss = trainer.compute_loss(model, dict(batch), False, count)
        after_chunked = torch.get_rng_state()
        torch.set_rng_state(start)
        plain = Trainer.compute_loss(trainer, model, dict(batch), False, count)
        assert torch.equal(torch.get_rng_state(), after_chunked)
    assert "changes its logits" in trainer.chunked_loss_refused
    assert "changes its logits" in capsys.readouterr().out
    assert float(loss.detach()) == pytest.approx(float(plain.detach()), abs=TOLERANCE)
