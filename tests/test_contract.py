"""The method contract, one table of cases times the five tiny families.

Every registered method has at least one row. Each check is its own test, parametrised over the
table x families, so a failure names the check, the case and the family: only the intended
parameters train; the output is unchanged at initialisation where the method promises it; the
first optimizer step changes only trainable parameters; save then load gives the same outputs;
merge gives the same outputs with the base's parameter names (or is refused with a reason); PEFT
loads PEFT-format adapters to the same logits, and refuses peftkit's own.

Each (case, family) trains once per module (`runs`), built by whichever test asks first, so any
test passes alone and in any order. Method-specific behaviour lives in each method's test file."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch

import peftkit
from contract import FAMILIES, Case, Run, logits, logits_and_loss, run_case, tiny
from peftkit.errors import AdapterError, ConfigError, TargetError
from peftkit.methods import relora
from peftkit.registry import method_for_config, method_names

HEADS = r"classifier|score"  # a new classification head (tiny BERT's) trains with every method
LORA_PARAMS = rf"lora_|{HEADS}"
NORMS = r"LayerNorm|layer_norm|layernorm|ln_\d"
VIRTUAL = rf"^virtual\.|{HEADS}"
# Tiny T5, Llama and Qwen2 lack biases on (some of) the layers BitFit selects: it adds zero ones.
BIAS_LESS = {"t5", "llama", "qwen2"}
NO_PEFT_PREFIX_FOR_BERT = {"bert": "PEFT refuses prefix tuning for BERT encoders"}
# PEFT's LyCORIS (LoHa, LoKr) and OFT layers wrap torch.nn.Linear only; GPT-2's layers are all
# transformers Conv1D, so these methods refuse it (TargetError) instead of adapting nothing.
LINEAR_ONLY = {"gpt2": "PEFT's layers for this method wrap nn.Linear, GPT-2 has only Conv1D"}

CASES = [
    Case("lora", lambda family: peftkit.LoraConfig(dropout=0.0), LORA_PARAMS, peft_loadable=True),
    Case(
        "lora-all-linear",
        lambda family: peftkit.LoraConfig(rank=2, dropout=0.0, target_modules="all-linear"),
        LORA_PARAMS,
        peft_loadable=True,
    ),
    Case(
        "rslora",
        lambda family: peftkit.RsLoraConfig(rank=4, dropout=0.0),
        LORA_PARAMS,
        peft_loadable=True,
    ),
    Case(
        "dora",
        lambda family: peftkit.DoraConfig(rank=4, dropout=0.0),
        LORA_PARAMS,
        peft_loadable=True,
    ),
    Case(
        "adalora",
        lambda family: peftkit.AdaLoraConfig(init_rank=4, target_rank=2, total_steps=10),
        LORA_PARAMS,
        peft_loadable=True,
        peft_loss_differs="PEFT's AdaLoRA forward adds its own orthogonality term to the loss "
        "(and, loaded for inference, fails computing it); peftkit adds it once, in extra_loss",
    ),
    Case(
        "relora",
        # A restart after the second step (merge, re-initialise, reset), then a step on the
        # fresh LoRA, so the saved adapter holds both a merged update and a current LoRA. No
        # re-warm: the step after the restart would otherwise run at learning rate 0.
        lambda family: peftkit.ReLoraConfig(
            rank=4, dropout=0.0, restart_every=2, restart_warmup_steps=0
        ),
        LORA_PARAMS,
        steps=3,
        reached=lambda model: relora.state(model).restarts >= 1,
    ),
    Case(
        "bottleneck-houlsby",
        lambda family: peftkit.BottleneckConfig(placement="houlsby", bottleneck_size=4),
        rf"bottleneck_adapter|{NORMS}|{HEADS}",
        mergeable=False,
    ),
    Case(
        "bottleneck-pfeiffer",
        lambda family: peftkit.BottleneckConfig(placement="pfeiffer", bottleneck_size=4),
        rf"bottleneck_adapter|{HEADS}",
        mergeable=False,
    ),
    Case(
        "bitfit",
        lambda family: peftkit.BitFitConfig(
            missing_biases="add" if family in BIAS_LESS else "error"
        ),
        rf"bias$|{HEADS}",
        merge_adds=r"\.bias$",  # the zero biases BitFit added (missing_biases='add') stay
    ),
    Case("child_tuning-F", lambda family: peftkit.ChildTuningConfig(mode="F"), None),
    Case(
        "child_tuning-D",
        lambda family: peftkit.ChildTuningConfig(mode="D"),
        rf"\.values$|{HEADS}",
    ),
    Case(
        "prompt_tuning",
        lambda family: peftkit.PromptTuningConfig(num_virtual_tokens=4),
        VIRTUAL,
        unchanged_at_init=False,  # the soft prompt is new input from the start
        mergeable=False,
        peft_loadable=True,
    ),
    Case(
        "prefix_tuning-direct",
        lambda family: peftkit.PrefixTuningConfig(num_virtual_tokens=4),
        VIRTUAL,
        unchanged_at_init=False,  # the prefix is attended to from the start
        mergeable=False,
        peft_loadable=True,
        peft_excluded=NO_PEFT_PREFIX_FOR_BERT,
    ),
    Case(
        "prefix_tuning-mlp",
        lambda family: peftkit.PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16),
        VIRTUAL,
        unchanged_at_init=False,
        mergeable=False,
        peft_loadable=True,
        peft_excluded=NO_PEFT_PREFIX_FOR_BERT,
    ),
    # (IA)^3: every vector starts at 1, the identity. Defaults: keys, values and the second
    # feed-forward projection of each family (targeting.FEED_FORWARD_DOWN).
    Case("ia3", lambda family: peftkit.IA3Config(), rf"ia3_l|{HEADS}", peft_loadable=True),
    # LoHa starts with one factor of the second product at zero: dW = 0.
    Case(
        "loha",
        lambda family: peftkit.LoHaConfig(rank=4),
        rf"hada_|{HEADS}",
        peft_loadable=True,
        excluded=LINEAR_ONLY,
    ),
    # LoKr starts with the small Kronecker factor at zero: dW = 0.
    Case(
        "lokr",
        lambda family: peftkit.LoKrConfig(rank=4),
        rf"lokr_|{HEADS}",
        peft_loadable=True,
        excluded=LINEAR_ONLY,
    ),
    # VeRA starts with lambda_b at zero: dW = 0. All linear layers, so layers of different
    # shapes share the one pair of random matrices (PEFT slices it per layer).
    Case(
        "vera-all-linear",
        lambda family: peftkit.VeraConfig(rank=8, target_modules="all-linear"),
        rf"vera_lambda_|{HEADS}",
        peft_loadable=True,
    ),
    # OFT starts with every skew-symmetric Q at zero: R = I.
    Case(
        "oft",
        lambda family: peftkit.OFTConfig(block_size=8),
        rf"oft_R|{HEADS}",
        peft_loadable=True,
        excluded=LINEAR_ONLY,
    ),
    Case("full", lambda family: peftkit.FullConfig(), None),
]


def rows(applies: Callable[[Case, str], bool] = lambda case, family: True) -> list:
    """(case, family) parameters for every pair `applies` accepts, named 'label-family'."""
    return [
        pytest.param(case, family, id=f"{case.label}-{family}")
        for case in CASES
        for family in FAMILIES
        if family not in case.excluded and applies(case, family)
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Case, str], Run]:
    """One training run per (case, family) in this module, made by the first test that asks."""
    cache: dict[tuple[str, str], Run] = {}

    def get(case: Case, family: str) -> Run:
        key = (case.label, family)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{case.label}-{family}")
            cache[key] = run_case(case, family, folder)
        return cache[key]

    return get


def test_every_registered_method_has_a_row():
    covered = {method_for_config(case.config(family)).name for case in CASES for family in FAMILIES}
    assert covered == set(method_names())
    labels = [case.label for case in CASES]
    assert len(labels) == len(set(labels)), "case labels name the tests: they must be unique"


@pytest.mark.parametrize(
    ("case", "family"),
    [
        pytest.param(case, family, id=f"{case.label}-{family}")
        for case in CASES
        for family in case.excluded
    ],
)
def test_excluded_family_is_refused(case, family):
    """An exclusion is a refusal with a message, never a method that silently adapts nothing."""
    model, _ = tiny(family)
    with pytest.raises(TargetError, match="target_modules"):
        peftkit.apply(model, case.config(family))
    assert not any(type(m).__module__.startswith("peft") for m in model.modules())


@pytest.mark.parametrize(("case", "family"), rows())
def test_only_intended_parameters_train(case, family, runs):
    run = runs(case, family)
    assert run.trainable, "the method made nothing trainable"
    if case.trainable is None:
        assert run.trainable == run.names, "every parameter should train"
        return
    wrong = [n for n in run.trainable if not re.search(case.trainable, n)]
    assert not wrong, f"unintended trainable parameters: {wrong[:5]}"
    assert any(not re.search(HEADS, n) for n in run.trainable), "only the task head trains"


@pytest.mark.parametrize(("case", "family"), rows(lambda case, family: case.unchanged_at_init))
def test_unchanged_at_init(case, family, runs):
    run = runs(case, family)
    torch.testing.assert_close(run.at_init, run.reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("case", "family"), rows())
def test_step_changes_only_trainable(case, family, runs):
    run = runs(case, family)
    frozen_moved = sorted(set(run.moved_by_first_step) - set(run.trainable))
    assert not frozen_moved, f"frozen parameters changed: {frozen_moved[:5]}"
    assert run.moved_by_first_step, "the step changed nothing"
    assert not torch.allclose(run.tuned, run.at_init), "training did not change the output"


@pytest.mark.parametrize(("case", "family"), rows(lambda case, family: case.reached is not None))
def test_training_reaches_what_the_case_needs(case, family, runs):
    assert runs(case, family).reached


@pytest.mark.parametrize(("case", "family"), rows())
def test_save_load_roundtrip(case, family, runs):
    run = runs(case, family)
    fresh, _ = tiny(family)
    loaded = peftkit.load(fresh, run.adapter)
    torch.testing.assert_close(logits(loaded, run.batch), run.tuned, atol=1e-5, rtol=0)


# BitFit's merge warns that T5's and Qwen2's configs cannot declare its added biases for a
# save_pretrained round trip; this check keeps the merged model in memory.
@pytest.mark.filterwarnings("ignore:BitFit.*cannot declare the biases:UserWarning")
@pytest.mark.parametrize(("case", "family"), rows(lambda case, family: case.mergeable))
def test_merge_equals_unmerged(case, family, runs):
    run = runs(case, family)
    fresh, _ = tiny(family)
    base_class = type(fresh)
    merged = peftkit.merge(peftkit.load(fresh, run.adapter))
    assert type(merged) is base_class, "merge should give back a plain transformers model"
    names = {n for n, _ in merged.named_parameters()}
    assert not set(run.base_names) - names, "merge lost base parameters"
    extra = sorted(n for n in names - set(run.base_names))
    unexpected = [n for n in extra if not (case.merge_adds and re.search(case.merge_adds, n))]
    assert not unexpected, f"merged model has parameters the base lacks: {unexpected[:5]}"
    torch.testing.assert_close(logits(merged, run.batch), run.tuned, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("case", "family"), rows(lambda case, family: not case.mergeable))
def test_unmergeable_method_refuses_merge(case, family, runs):
    run = runs(case, family)
    fresh, _ = tiny(family)
    with pytest.raises(AdapterError, match="cannot"):
        peftkit.merge(peftkit.load(fresh, run.adapter))


def _switches_off(case: Case, family: str) -> bool:
    """Whether the case's method has the switch-off capability; checked on the generative
    families (a classifier head a run trains is the model's own, with nothing to switch back to)."""
    return method_for_config(case.config(family)).switch_off is not None and family != "bert"


@pytest.mark.parametrize(("case", "family"), rows(_switches_off))
def test_switched_off_adapter_computes_the_base(case, family, runs):
    """Inside the record's switch-off the trained adapter computes the base's logits, and the
    tuned ones again after it: Proxy-Tuning's anti-expert and a preference-tuning reference."""
    run = runs(case, family)
    assert (run.tuned - run.reference).abs().max() > 1e-4, "the adapter barely matters"
    loaded = peftkit.load(tiny(family)[0], run.adapter)
    off = peftkit.api.applied(loaded).method.switch_off(loaded)
    with off():
        torch.testing.assert_close(logits(loaded, run.batch), run.reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(loaded, run.batch), run.tuned, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("case", "family"),
    rows(lambda case, family: method_for_config(case.config(family)).switch_off is None),
)
def test_a_method_that_cannot_switch_off_is_refused_as_anti_expert(case, family, runs):
    """Methods that change the base's own weights have nothing to switch off: WithoutAdapter
    refuses them by name instead of returning the tuned model as the 'untuned' one."""
    from peftkit.decoding.proxy import WithoutAdapter

    run = runs(case, family)
    loaded = peftkit.load(tiny(family)[0], run.adapter)
    name = method_for_config(case.config(family)).name
    with pytest.raises(ConfigError, match=f"a {name} model"):
        WithoutAdapter(loaded)


def _saved_config(adapter: Path) -> dict:
    return json.loads((adapter / "adapter_config.json").read_text())


@pytest.mark.parametrize(
    ("case", "family"),
    rows(lambda case, family: case.peft_loadable and family not in case.peft_excluded),
)
def test_peft_loads_it(case, family, runs):
    """peft.PeftModel.from_pretrained on a fresh base gives the logits and loss peftkit had."""
    run = runs(case, family)
    # Without this, a PEFT that ignored the adapter could pass within the tolerance.
    assert (run.tuned - run.reference).abs().max() > 1e-4, "the adapter barely matters"
    saved = _saved_config(run.adapter)
    assert saved["peft_type"] == method_for_config(case.config(family)).peft_type
    assert "peftkit_method" not in saved
    fresh, _ = tiny(family)
    inputs = {k: v for k, v in run.batch.items() if k != "labels"}
    if FAMILIES[family] == "seq2seq":  # the decoder inputs the labels would have made
        inputs["decoder_input_ids"] = fresh.prepare_decoder_input_ids_from_labels(
            labels=run.batch["labels"]
        )
    model = peft.PeftModel.from_pretrained(fresh, run.adapter)
    ours, theirs = run.tuned, logits(model, inputs)
    if theirs.dim() == 3 and theirs.shape[1] > ours.shape[1]:
        theirs = theirs[:, -ours.shape[1] :]  # PEFT keeps prompt tuning's virtual positions
    if FAMILIES[family] == "causal-lm":  # compare real tokens: PEFT pads virtual tokens its way
        real = run.batch["attention_mask"].bool()
        ours, theirs = ours[real], theirs[real]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    if case.peft_loss_differs is None:
        their_loss = logits_and_loss(model, run.batch)[1]
        torch.testing.assert_close(their_loss, run.tuned_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("case", "family"), rows(lambda case, family: not case.peft_loadable))
def test_peft_refuses_peftkit_format(case, family, runs):
    """peftkit's own files name their method and no peft_type, so PEFT refuses the folder."""
    run = runs(case, family)
    saved = _saved_config(run.adapter)
    assert "peft_type" not in saved
    assert saved["peftkit_method"] == method_for_config(case.config(family)).name
    fresh, _ = tiny(family)
    with pytest.raises(KeyError, match="peft_type"):
        peft.PeftModel.from_pretrained(fresh, run.adapter)
