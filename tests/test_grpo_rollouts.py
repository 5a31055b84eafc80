"""GRPO's rollouts through peftkit's batched decoding (training/rollouts.py): the same token ids
as TRL's default path (transformers' generate) under the same random state, greedy completions
equal to `generate` with the adapter live, log-probabilities equal to a forward pass, a GRPO step
that trains through them, and the option refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from test_grpo import built_trainer, grpo_task, id_reward, perturb_adapter

from peftkit.errors import ConfigError
from peftkit.tasks import rewards
from peftkit.tasks.config import GRPOConfig
from peftkit.training import grpo, rollouts
from peftkit.training.rollouts import Sampler, rollout, trl_sampler

# Token ids that end a completion in the sampling test: 1 (EOS) and twenty others of the tiny
# vocabulary (260), so that rows stop at different steps and leave the batch.
STOPS = [1, *range(40, 60)]


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewards registered in a test are gone after it."""
    monkeypatch.setattr(rewards, "_REWARDS", dict(rewards._REWARDS))


def trainer_for(tmp_path: Path, rollouts_option: str = "peftkit", length: int = 12):  # noqa: ANN201
    """(trainer, notes, model, data) on the tiny Llama with a LoRA moved off its start."""
    rewards.register_reward("id-sum", id_reward)
    options = GRPOConfig(num_generations=4, max_completion_length=length, rollouts=rollouts_option)
    trainer, notes, model, data = built_trainer(tmp_path, grpo_task("id-sum"), options)
    perturb_adapter(model)
    return trainer, notes, model, data


def grouped_prompts(tokenizer) -> list[list[int]]:  # noqa: ANN001
    """Three prompts of different lengths, each repeated four times (as TRL's sampler does)."""
    texts = ["copy: ab cd\n", "copy: e f g h i\n", "x"]
    return [tokenizer(text)["input_ids"] for text in texts for _ in range(4)]


def counting(monkeypatch: pytest.MonkeyPatch) -> list[list[list[int]]]:
    """The prompts of every call the trainer makes to peftkit's rollouts (patched for a test)."""
    calls: list[list[list[int]]] = []

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(args[1])
        return rollout(*args, **kwargs)

    monkeypatch.setattr(grpo, "rollout", counted)
    return calls


def test_sampled_rollouts_are_trls_tokens_under_the_same_seed(
    tmp_path: Path, registry: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trl import GRPOTrainer

    trainer, _, _, data = trainer_for(tmp_path)
    # Stop tokens that end rows early, and top_k/top_p/temperature set on both paths.
    trainer.eos_token_ids = STOPS
    trainer.generation_config.eos_token_id = STOPS
    trainer.generation_kwargs["eos_token_id"] = STOPS
    for key, value in (("top_k", 50), ("top_p", 0.95), ("temperature", 0.8)):
        setattr(trainer, key, value)
        setattr(trainer.generation_config, key, value)
        trainer.generation_kwargs[key] = value
    trainer._peftkit_sampler = trl_sampler(trainer)
    assert trainer._peftkit_sampler == Sampler(0.8, 50, 0.95, None)
    prompts = grouped_prompts(data.tokenizer)
    calls, lengths = counting(monkeypatch), []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        theirs, _ = GRPOTrainer._generate_single_turn(trainer, prompts, None, {}, 4)
        after_theirs = torch.rand(3)
        torch.manual_seed(seed)
        ours, logprobs = trainer._generate_single_turn(prompts, None, {}, 4)
        assert ours == theirs and logprobs is None  # as TRL's default path returns
        assert torch.equal(torch.rand(3), after_theirs)  # the random stream used alike
        for ids in ours:  # each ends at its first stop token, or runs the full length
            stops_at = [i for i, token in enumerate(ids) if token in STOPS]
            assert stops_at == [len(ids) - 1] or (not stops_at and len(ids) == 12)
        lengths += [len(ids) for ids in ours]
    assert len(calls) == 3
    assert min(lengths) < 6 and max(lengths) == 12  # rows left the batch at different steps


def test_greedy_rollouts_equal_generate_with_the_adapter_live(
    tmp_path: Path, registry: None
) -> None:
    _, _, model, data = trainer_for(tmp_path)
    tokenizer = data.tokenizer
    prompts = grouped_prompts(tokenizer)[::4]
    greedy = Sampler(do_sample=False)
    result = rollout(model, prompts, greedy, 10, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    assert result.prefill_rows == 3
    for prompt, ids in zip(prompts, result.completion_ids, strict=True):
        with torch.no_grad():  # each prompt alone: no padding at all
            out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=10,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        new = out[0, len(prompt) :].tolist()
        eos = tokenizer.eos_token_id
        assert ids == (new[: new.index(eos) + 1] if eos in new else new)
    with model.disable_adapter():  # the adapter is what decides these completions
        base = rollout(model, prompts, greedy, 10, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    assert base.completion_ids != result.completion_ids


def test_sampled_log_probs_equal_a_forward_pass(tmp_path: Path, registry: None) -> None:
    _, _, model, data = trainer_for(tmp_path)
    tokenizer = data.tokenizer
    prompts = grouped_prompts(tokenizer)
    torch.manual_seed(0)
    result = rollout(model, prompts, Sampler(temperature=0.7), 8, STOPS, tokenizer.pad_token_id)
    assert result.prefill_rows == 3 and len(result.completion_ids) == 12
    assert len({tuple(ids) for ids in result.completion_ids}) > 3  # a group's rows differ
    for prompt, ids, logprobs in zip(prompts, result.completion_ids, result.logprobs, strict=True):
        assert 1 <= len(ids) == len(logprobs) <= 8
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + ids])).logits[0].double()
        expected = F.log_softmax(logits[len(prompt) - 1 : -1] / 0.7, -1)
        expected = expected.gather(1, torch.tensor(ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(logprobs, dtype=torch.double), expected, atol=1e-4)


def test_a_grpo_step_trains_through_peftkits_rollouts(
    tmp_path: Path, registry: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer, notes, model, _ = trainer_for(tmp_path, length=6)
    assert notes["grpo"]["rollouts"].startswith("peftkit")
    calls = counting(monkeypatch)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train()
    assert len(calls) == 1 and len(calls[0]) == 8  # one step: 2 prompts x 4 completions
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in name for name in changed)


def test_the_trl_path_stays_trls_and_unknown_values_are_refused(
    tmp_path: Path, registry: None
) -> None:
    from trl import GRPOTrainer

    trainer, notes, _, _ = trainer_for(tmp_path, "trl")
    assert notes["grpo"]["rollouts"].startswith("trl")
    assert type(trainer)._generate_single_turn is GRPOTrainer._generate_single_turn
    with pytest.raises(ConfigError, match="grpo.rollouts 'vllm' is not known.*peftkit, trl"):
        GRPOConfig(rollouts="vllm")
    trainer.repetition_penalty = 1.2
    with pytest.raises(ConfigError, match="repetition_penalty. Set grpo.rollouts: trl"):
        trl_sampler(trainer)


def test_a_method_with_virtual_tokens_is_refused_before_training(tmp_path: Path) -> None:
    import peftkit
    from peftkit.models import load_model
    from peftkit.registry import get_method

    model, tokenizer = load_model("tiny-llama", "causal-lm", seed=0)
    model = peftkit.apply(model, get_method("prompt_tuning").config_cls())
    with pytest.raises(ConfigError, match="holds 22 positions for 2 prompt tokens"):
        rollouts.check_model(model, tokenizer.pad_token_id)
