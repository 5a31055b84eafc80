"""The method contract on a quantised base: every registered method (the contract table's rows)
on every tiny family, its linear layers in NF4, either trains as it does on a float32 base (only
its parameters train, in float32; save then load onto a fresh NF4 base gives the same outputs;
merge folds into dequant(W) with the same outputs; PEFT reads PEFT-format files onto the same NF4
base) or is refused, by its record, with a message naming the methods that work."""

from __future__ import annotations

import re
from collections.abc import Callable

import peft
import pytest
import torch
from test_contract import CASES, HEADS

import peftkit
from contract import FAMILIES, Run, logits, run_case, tiny
from peftkit.errors import ConfigError
from peftkit.registry import method_for_config

NF4 = {"quantize": "nf4"}
ROWS = [
    pytest.param(case, family, id=f"{case.label}-{family}")
    for case in CASES
    for family in FAMILIES
    if family not in case.excluded  # a family the method refuses (test_contract checks that)
]


def refused(case, family) -> bool:  # noqa: ANN001
    """Whether the case's method refuses a quantised base (it changes the base's own weights, or
    cannot wrap quantised layers)."""
    method = method_for_config(case.config(family))
    return bool(method.needs_float32_base or method.no_quantized_base)


def trained(rows_filter: Callable = lambda case, family: True) -> list:
    """The rows whose method trains on a quantised base (and that `rows_filter` accepts)."""
    return [row for row in ROWS if not refused(*row.values) and rows_filter(*row.values)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Callable:
    """One NF4 training run per (case, family), made by the first test that asks."""
    cache: dict[tuple[str, str], Run] = {}

    def get(case, family) -> Run:  # noqa: ANN001
        key = (case.label, family)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"nf4-{case.label}-{family}")
            cache[key] = run_case(case, family, folder, **NF4)
        return cache[key]

    return get


@pytest.mark.parametrize(("case", "family"), [r for r in ROWS if refused(*r.values)])
def test_a_method_changing_the_base_is_refused(case, family):
    model, _ = tiny(family, **NF4)
    with pytest.raises(ConfigError, match="cannot train on a base (stored in|quantised to) nf4"):
        peftkit.apply(model, case.config(family))
    try:
        peftkit.apply(tiny(family, **NF4)[0], case.config(family))
    except ConfigError as error:
        message = str(error)
    changes_base = method_for_config(case.config(family)).needs_float32_base
    assert ("cannot be updated in place" in message) == bool(changes_base)
    assert "lora" in message.lower() and "base.quantize" in message


@pytest.mark.parametrize(("case", "family"), trained())
def test_only_intended_parameters_train_in_float32(case, family, runs):
    run = runs(case, family)
    assert run.trainable
    wrong = [n for n in run.trainable if not re.search(case.trainable, n)]
    assert not wrong, f"unintended trainable parameters: {wrong[:5]}"
    assert any(not re.search(HEADS, n) for n in run.trainable), "only the task head trains"
    frozen_moved = sorted(set(run.moved_by_first_step) - set(run.trainable))
    assert not frozen_moved, f"frozen parameters changed: {frozen_moved[:5]}"
    assert run.moved_by_first_step and not torch.allclose(run.tuned, run.at_init)


@pytest.mark.parametrize(("case", "family"), trained(lambda c, f: c.unchanged_at_init))
def test_unchanged_at_init(case, family, runs):
    run = runs(case, family)
    torch.testing.assert_close(run.at_init, run.reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("case", "family"), trained())
def test_save_load_onto_a_fresh_nf4_base(case, family, runs):
    run = runs(case, family)
    fresh, _ = tiny(family, **NF4)
    loaded = peftkit.load(fresh, run.adapter)
    assert all(p.dtype == torch.float32 for p in loaded.parameters() if p.requires_grad)
    torch.testing.assert_close(logits(loaded, run.batch), run.tuned, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:BitFit.*cannot declare the biases:UserWarning")
@pytest.mark.parametrize(("case", "family"), trained(lambda c, f: c.mergeable))
def test_merge_onto_dequantized_equals_unmerged(case, family, runs):
    run = runs(case, family)
    fresh, _ = tiny(family, **NF4)
    merged = peftkit.merge(peftkit.load(fresh, run.adapter))
    assert not any("4bit" in type(m).__name__ for m in merged.modules())
    torch.testing.assert_close(logits(merged, run.batch), run.tuned, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("case", "family"), trained(lambda c, f: not c.mergeable))
def test_unmergeable_method_refuses_merge(case, family, runs):
    fresh, _ = tiny(family, **NF4)
    with pytest.raises(Exception, match="cannot"):
        peftkit.merge(peftkit.load(fresh, runs(case, family).adapter))


@pytest.mark.parametrize(
    ("case", "family"),
    trained(lambda c, f: c.peft_loadable and f not in c.peft_excluded and FAMILIES[f] != "seq2seq"),
)
def test_peft_loads_it_onto_the_same_nf4_base(case, family, runs):
    run = runs(case, family)
    fresh, _ = tiny(family, **NF4)
    model = peft.PeftModel.from_pretrained(fresh, run.adapter)
    inputs = {k: v for k, v in run.batch.items() if k != "labels"}
    ours, theirs = run.tuned, logits(model, inputs)
    if theirs.dim() == 3 and theirs.shape[1] > ours.shape[1]:
        theirs = theirs[:, -ours.shape[1] :]  # PEFT keeps prompt tuning's virtual positions
    if FAMILIES[family] == "causal-lm":
        real = run.batch["attention_mask"].bool()
        ours, theirs = ours[real], theirs[real]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
