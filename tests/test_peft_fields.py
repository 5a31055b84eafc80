"""peftkit.load honours every field PEFT saves in adapter_config.json, or refuses naming it.

Each adapter here is written by PEFT itself on a tiny Qwen2 (every trained tensor set to random
values, so a field that is dropped changes the output); PEFT's own PeftModel.from_pretrained is
the reference. merge, export, eval and generate all load through peftkit.load."""

import json

import peft
import pytest
import torch

import peftkit
from contract import batch_for, logits, tiny
from peftkit.errors import AdapterError
from peftkit.methods.lora import fast as lora_fast

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj"]

# (case id, PEFT config) for adapters peftkit must load exactly as PEFT does
CASES = [
    ("lora-alpha_pattern", peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                           alpha_pattern={"k_proj": 32, "up_proj": 2})),
    ("lora-rank_pattern", peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                          rank_pattern={"v_proj": 2, "layers.1.mlp.up_proj": 6})),
    ("lora-layers_to_transform", peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                 layers_to_transform=[1], layers_pattern="layers")),
    ("lora-exclude_modules", peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                             exclude_modules=["model.layers.0.self_attn.k_proj"])),
    ("lora-bias_all", peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, bias="all")),
    ("lora-bias_lora_only", peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                            bias="lora_only")),
    ("lora-modules_to_save", peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                             modules_to_save=["lm_head"])),
    ("lora-trainable_token_indices", peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                     trainable_token_indices=[3, 70, 101])),
    ("dora-alpha_pattern", peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                           use_dora=True, alpha_pattern={"v_proj": 24})),
    ("rslora-rank_pattern", peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                            use_rslora=True, rank_pattern={"q_proj": 8})),
    ("loha-alpha_pattern", peft.LoHaConfig(r=4, alpha=8, target_modules=TARGETS,
                                           alpha_pattern={"k_proj": 32})),
    ("loha-rank_pattern", peft.LoHaConfig(r=4, alpha=8, target_modules=TARGETS,
                                          rank_pattern={"v_proj": 2})),
    ("lokr-alpha_pattern", peft.LoKrConfig(r=4, alpha=8, target_modules=TARGETS,
                                           alpha_pattern={"k_proj": 32})),
    ("lokr-rank_pattern-layers", peft.LoKrConfig(r=4, alpha=8, target_modules=TARGETS,
                                                 rank_pattern={"v_proj": 2},
                                                 layers_to_transform=[0])),
    ("ia3-exclude_modules", peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                           feedforward_modules=["down_proj"],
                                           exclude_modules=["model.layers.1.self_attn.v_proj"])),
    ("vera-layers_to_transform", peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                 layers_to_transform=[1])),
    ("oft-exclude_modules", peft.OFTConfig(r=0, oft_block_size=8, target_modules=TARGETS,
                                           exclude_modules=["model.layers.0.mlp.up_proj"])),
]  # fmt: skip


def _randomise(model: torch.nn.Module) -> None:
    """Every trainable tensor (the adapter, saved heads, token rows, biases) to random values,
    so that a field peftkit dropped shows in the output."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.copy_(parameter + 0.3 * noise)


def _peft_adapter(folder, config) -> None:
    """An adapter written by PEFT itself on the tiny Qwen2, with random trained tensors."""
    model, _ = tiny("qwen2")
    tuned = peft.get_peft_model(model, config)
    _randomise(tuned)
    tuned.save_pretrained(folder)


def _peft_logits(folder, batch, merged: bool = False) -> torch.Tensor:
    """What PEFT computes with the adapter (merged into the base by PEFT: `merged`)."""
    base, _ = tiny("qwen2")
    model = peft.PeftModel.from_pretrained(base, folder)
    return logits(model.merge_and_unload() if merged else model, batch)


@pytest.mark.parametrize("case, config", CASES, ids=[case for case, _ in CASES])
def test_load_matches_peft(tmp_path, case, config):
    folder = tmp_path / case
    _peft_adapter(folder, config)
    _, tokenizer = tiny("qwen2")
    batch = batch_for("qwen2", tokenizer)
    expected = _peft_logits(folder, batch)
    base, _ = tiny("qwen2")
    assert not torch.allclose(logits(base, batch), expected, atol=1e-3)  # the adapter matters
    loaded = peftkit.load(base, folder)
    # peftkit's fast LoRA forward sums in another order than PEFT's (one addmm over siblings'
    # concatenated A): float32 rounding up to about 1e-4 on logits up to 4.9; a dropped field
    # is off by 0.1 or more. Without it, the loaded model computes PEFT's logits within 1e-5.
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-4, rtol=0)
    lora_fast.uninstall(loaded)
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=0)
    # the adapter peftkit saves again is the one it loaded: PEFT reads it to the same output
    peftkit.save(loaded, tmp_path / "again")
    torch.testing.assert_close(_peft_logits(tmp_path / "again", batch), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "case", ["lora-alpha_pattern", "lora-modules_to_save", "lora-trainable_token_indices",
             "lokr-alpha_pattern"],
)  # fmt: skip
def test_merge_matches_peft(tmp_path, case):
    config = dict(CASES)[case]
    folder = tmp_path / case
    _peft_adapter(folder, config)
    _, tokenizer = tiny("qwen2")
    batch = batch_for("qwen2", tokenizer)
    expected = _peft_logits(folder, batch, merged=True)
    base, _ = tiny("qwen2")
    merged = peftkit.merge(peftkit.load(base, folder))
    assert not isinstance(merged, peft.PeftModel)
    torch.testing.assert_close(logits(merged, batch), expected, atol=1e-5, rtol=0)


def _edited(tmp_path, **fields) -> str:
    """A PEFT LoRA adapter whose adapter_config.json is then given `fields`."""
    folder = tmp_path / "edited"
    _peft_adapter(folder, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    path = folder / "adapter_config.json"
    saved = json.loads(path.read_text())
    saved.update(fields)
    path.write_text(json.dumps(saved))
    return folder


def test_field_peft_does_not_know_is_refused_by_name(tmp_path):
    folder = _edited(tmp_path, lora_frobnication=3)
    base, _ = tiny("qwen2")
    before = {name: p.clone() for name, p in base.state_dict().items()}
    with pytest.raises(AdapterError, match=r"'lora_frobnication' = 3"):
        peftkit.load(base, folder)
    assert not any(type(m).__module__.startswith("peft.") for m in base.modules())
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_field_the_load_does_not_carry_is_refused_by_name(tmp_path, monkeypatch):
    # A field PEFT knows but the built config lost (here: a builder that drops alpha_pattern)
    # is named by the check after apply, not loaded with a wrong output.
    from peftkit.methods.peft_tuners import base as peft_tuner

    folder = _edited(tmp_path, alpha_pattern={"k_proj": 32})
    original = peft_tuner.build_peft_config

    def dropping(peft_cls, options, config):
        built = original(peft_cls, options, config)
        built.alpha_pattern = {}
        return built

    monkeypatch.setattr("peftkit.methods.lora.build_peft_config", dropping)
    base, _ = tiny("qwen2")
    with pytest.raises(AdapterError, match=r"'alpha_pattern' = \{'k_proj': 32\}"):
        peftkit.load(base, folder)


def test_peft_fields_from_a_config_reach_peft():
    # The same field set from Python (or a recipe) builds PEFT's config with it.
    model, _ = tiny("qwen2")
    config = peftkit.LoraConfig(
        rank=4, target_modules=TARGETS, peft_fields={"alpha_pattern": {"k_proj": 32}}
    )
    tuned = peftkit.apply(model, config)
    layer = tuned.base_model.model.model.layers[0].self_attn
    assert layer.k_proj.scaling["default"] == 32 / 4
    assert layer.q_proj.scaling["default"] == 16 / 4


def test_adalora_field_it_cannot_honour_is_refused_by_name(tmp_path):
    # AdaLoRA keeps its own config (no peft_fields): a PEFT field it would drop is named.
    config = peft.AdaLoraConfig(init_r=4, target_r=2, target_modules=TARGETS, total_step=10,
                                exclude_modules=["model.layers.0.self_attn.k_proj"])  # fmt: skip
    _peft_adapter(tmp_path / "adalora", config)
    base, _ = tiny("qwen2")
    with pytest.raises(AdapterError, match=r"'exclude_modules' = \['model.layers.0.self_attn"):
        peftkit.load(base, tmp_path / "adalora")
    assert not any(type(m).__module__.startswith("peft.") for m in base.modules())


def test_adalora_written_by_peft_loads_to_its_logits(tmp_path):
    config = peft.AdaLoraConfig(init_r=4, target_r=2, target_modules=TARGETS, total_step=10)
    _peft_adapter(tmp_path / "adalora", config)
    _, tokenizer = tiny("qwen2")
    batch = batch_for("qwen2", tokenizer)
    expected = _peft_logits(tmp_path / "adalora", batch)
    loaded = peftkit.load(tiny("qwen2")[0], tmp_path / "adalora")
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "config",
    [
        peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                modules_to_save=["lm_head"]),
        peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                modules_to_save=["lm_head"]),
    ],
    ids=["prompt_tuning", "prefix_tuning"],
)  # fmt: skip
def test_virtual_tokens_refuse_a_module_to_save_they_do_not_load(tmp_path, config):
    # peftkit's own prompt/prefix tuning trains the task head only: PEFT's lm_head copy is named,
    # not reported as "does not fit this base model".
    _peft_adapter(tmp_path / "virtual", config)
    saved = json.loads((tmp_path / "virtual/adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["lm_head"]
    base, _ = tiny("qwen2")
    with pytest.raises(AdapterError, match=r"modules_to_save \['lm_head'\] trains \['lm_head'\]"):
        peftkit.load(base, tmp_path / "virtual")
    batch = batch_for("qwen2", tiny("qwen2")[1])  # the base computes as before: no hooks left
    torch.testing.assert_close(logits(base, batch), logits(tiny("qwen2")[0], batch))
