"""LoRA's init option: what each init promises, on the five tiny families.

PiSSA and OLoRA keep the model's output at step 0 because the base keeps the residual; their
initial update is checked against closed forms computed here from the original weights (the top-r
SVD part of W; W's projection onto the span of its first r columns). A trained PiSSA/OLoRA
adapter saves and loads (peftkit and PEFT both run the init again), merges, and PEFT's conversion
gives a plain LoRA that loads onto the original base. `remove` gives the base back."""

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftkit
from contract import FAMILIES, batch_for, logits, tiny, train_with_hooks
from peftkit.api import convert as convert_folder
from peftkit.cli import main
from peftkit.config import from_dict
from peftkit.errors import AdapterError, ConfigError
from peftkit.methods.lora import compose
from peftkit.methods.lora.convert import save_converted
from peftkit.methods.lora.init import initial_factors, lora_layers

# init -> families it runs on (OLoRA refuses GPT-2's Conv1D, EVA refuses encoder-decoders)
INITS = {
    "gaussian": list(FAMILIES),
    "pissa": list(FAMILIES),
    "olora": [f for f in FAMILIES if f != "gpt2"],
    "eva": [f for f in FAMILIES if f != "t5"],
}
CASES = [pytest.param(init, f, id=f"{init}-{f}") for init, fams in INITS.items() for f in fams]


def _config(init, **options):
    return peftkit.LoraConfig(rank=4, dropout=0.0, init=init, **options)


def _trained(init, family, steps=2, **options):
    """(model, batch, logits before training, base logits) after a few steps from `init`."""
    torch.manual_seed(0)
    base, tokenizer = tiny(family)
    batch = batch_for(family, tokenizer)
    reference = logits(base, batch)
    config = _config(init, **options)
    model = peftkit.apply(base, config)
    hooks = peftkit.api.applied(model).method.training_hooks(model, config)
    if hooks.prepare is not None:
        hooks.prepare(model, [batch])
    at_init = logits(model, batch)
    train_with_hooks(model, hooks, [batch], steps, lr=0.05)
    return model, batch, at_init, reference


@pytest.mark.parametrize(("init", "family"), CASES)
def test_output_unchanged_at_init_and_save_load_merge_and_peft(init, family, tmp_path):
    model, batch, at_init, reference = _trained(init, family)
    # PiSSA/OLoRA: W - s B0 A0 + s B0 A0 rounds in float32, hence a tolerance above bit level.
    torch.testing.assert_close(at_init, reference, atol=1e-4, rtol=1e-4)
    tuned = logits(model, batch)
    assert (tuned - reference).abs().max() > 1e-3, "training did not move the output"
    peftkit.save(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter/adapter_config.json").read_text())[
        "init_lora_weights"
    ] == (init if init != "kaiming" else True)
    loaded = peftkit.load(tiny(family)[0], tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, batch), tuned, atol=1e-5, rtol=0)
    merged = peftkit.merge(peftkit.load(tiny(family)[0], tmp_path / "adapter"))
    torch.testing.assert_close(logits(merged, batch), tuned, atol=1e-4, rtol=1e-4)
    if family != "t5":  # PEFT's T5 call needs decoder inputs built by hand; the rest is the same
        theirs = peft.PeftModel.from_pretrained(tiny(family)[0], tmp_path / "adapter")
        torch.testing.assert_close(logits(theirs, batch), tuned, atol=1e-5, rtol=0)


def _originals(family):
    return {n: m.weight.detach().clone() for n, m in tiny(family)[0].named_modules()
            if hasattr(m, "weight") and m.weight is not None}  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pissa_starts_from_the_top_singular_part(family):
    originals = _originals(family)
    model = peftkit.apply(tiny(family)[0], _config("pissa"))
    for name, layer in lora_layers(model).items():
        weight = originals[name].T if layer.fan_in_fan_out else originals[name]
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        principal = (u[:, :4] * s[:4]) @ vh[:4]
        start = (
            layer.scaling["default"]
            * layer.lora_B["default"].weight
            @ layer.lora_A["default"].weight
        )
        torch.testing.assert_close(start.double(), principal, atol=1e-5, rtol=1e-4)
        residual = layer.get_base_layer().weight
        residual = residual.T if layer.fan_in_fan_out else residual
        torch.testing.assert_close(residual.double(), weight.double() - principal, atol=1e-5,
                                   rtol=1e-4)  # fmt: skip


def test_olora_starts_from_the_span_of_the_first_columns():
    originals = _originals("llama")
    model = peftkit.apply(tiny("llama")[0], _config("olora"))
    for name, layer in lora_layers(model).items():
        weight = originals[name].double()
        basis, _ = torch.linalg.qr(weight[:, :4])  # the span of W's first r columns
        projection = basis @ basis.T @ weight
        b, a = layer.lora_B["default"].weight.double(), layer.lora_A["default"].weight.double()
        torch.testing.assert_close(b @ a, projection, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b.T @ b, torch.eye(4, dtype=b.dtype), atol=1e-5, rtol=0)
        scale = layer.scaling["default"]
        torch.testing.assert_close(
            layer.get_base_layer().weight.double(), weight - scale * projection, atol=1e-5,
            rtol=1e-4,
        )  # fmt: skip


def test_eva_starts_from_the_principal_directions_of_the_inputs():
    # Rank 16 on hidden size 32: PEFT's randomized SVD (q = 2r) is then exact, so the
    # directions can be compared with a plain SVD of the same inputs.
    torch.manual_seed(0)
    base, tokenizer = tiny("llama")
    batch = batch_for("llama", tokenizer)
    captured = {}
    layer = dict(base.named_modules())["model.layers.0.self_attn.q_proj"]
    handle = layer.register_forward_hook(lambda m, args, out: captured.setdefault("x", args[0]))
    logits(base, batch)
    handle.remove()
    mask = batch["attention_mask"].bool() & (batch["labels"] != -100)
    inputs = captured["x"][mask].double()
    _, _, vh = torch.linalg.svd(inputs - inputs.mean(0), full_matrices=False)
    expected = vh[:16].T @ vh[:16]  # projector onto the top-16 input directions

    config = peftkit.LoraConfig(rank=16, dropout=0.0, init="eva")
    model = peftkit.apply(base, config)
    peftkit.api.applied(model).method.training_hooks(model, config).prepare(model, [batch])
    a = lora_layers(model)["model.layers.0.self_attn.q_proj"].lora_A["default"].weight.double()
    torch.testing.assert_close(a.T @ a, expected, atol=1e-4, rtol=0)
    assert not any(layer.lora_B["default"].weight.any() for layer in lora_layers(model).values()), (
        "B must start at zero"
    )


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq"])
def test_remove_gives_the_base_back(init):
    originals = _originals("llama")
    model = peftkit.apply(tiny("llama")[0], _config(init))
    plain = peftkit.api.applied(model).method.take_out(model)
    for name, module in plain.named_modules():
        if name in originals and hasattr(module, "weight"):
            torch.testing.assert_close(module.weight, originals[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("init", "family"), [("pissa", "llama"), ("olora", "qwen2"),
                                              ("pissa", "gpt2")])  # fmt: skip
def test_conversion_loads_onto_the_original_base(init, family, tmp_path):
    model, batch, _, _ = _trained(init, family, use_rslora=(init == "olora"))
    tuned = logits(model, batch)
    start = initial_factors(model)
    save_converted(model, tmp_path / "plain", info={"base_model": f"tiny-{family}"})
    saved = json.loads((tmp_path / "plain/adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 8
    theirs = peft.PeftModel.from_pretrained(tiny(family)[0], tmp_path / "plain")
    # The two sides sum the same update in different orders (peftkit's fused addmm onto the
    # rewritten base; PEFT's rank-2r adapter onto the original): float32 rounding, ~1e-5.
    torch.testing.assert_close(logits(theirs, batch), tuned, atol=5e-5, rtol=0)
    # The converted update is s (B A - B0 A0), read from the files.
    tensors = load_file(tmp_path / "plain/adapter_model.safetensors")
    for name, layer in lora_layers(model).items():
        a0, b0, scale, _ = start[name]
        b, a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
        key = f"base_model.model.{name}"
        converted = tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]
        new_scale = theirs.base_model.model.get_submodule(name).scaling["default"]
        torch.testing.assert_close(new_scale * converted, scale * (b @ a - b0 @ a0), atol=1e-5,
                                   rtol=1e-4)  # fmt: skip


def test_compose_refuses_unconverted_and_converts_in_combine_path(tmp_path):
    model, batch, _, _ = _trained("pissa", "llama")
    tuned = logits(model, batch)
    peftkit.save(model, tmp_path / "pissa", info={"base_model": "tiny-llama"})
    with pytest.raises(AdapterError, match="initialised with pissa.*Convert it first"):
        compose.load_adapters(tiny("llama")[0], {"p": tmp_path / "pissa"})
    base = tiny("llama")[0]
    before = {n: p.clone() for n, p in base.named_parameters()}
    convert_folder(base, tmp_path / "pissa", tmp_path / "plain")
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters()), "base changed"
    loaded = compose.load_adapters(base, {"p": tmp_path / "plain"})
    torch.testing.assert_close(logits(loaded, batch), tuned, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "init, rewrites",
    [("pissa", True), ("pissa_niter_2", True), ("pissa_niter_16", True), ("olora", True),
     ("corda", True), ("loftq", True), ("lora_ga", True), (True, False), (False, False),
     ("gaussian", False), ("eva", False), ("orthogonal", False), ("mica", False), (None, False)],
)  # fmt: skip
def test_every_base_changing_init_peft_writes_is_recognised_and_refused_by_compose(
    init, rewrites, tmp_path
):
    from peftkit.methods.lora.init import changes_base

    assert changes_base(init) is rewrites
    model = peftkit.apply(tiny("llama")[0], peftkit.LoraConfig(rank=2))
    folder = peftkit.save(model, tmp_path / "a", info={"base_model": "tiny-llama"})
    saved = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**saved, "init_lora_weights": init}))
    base = tiny("llama")[0]
    before = {n: p.clone() for n, p in base.named_parameters()}
    if rewrites:
        with pytest.raises(AdapterError, match=f"initialised with {init}, which rewrote"):
            compose.load_adapters(base, {"a": folder})
        assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())


def test_convert_command_writes_an_adapter_peft_loads_on_the_original_base(tmp_path):
    model, batch, _, _ = _trained("olora", "qwen2")
    tuned = logits(model, batch)
    peftkit.save(model, tmp_path / "run" / "adapter", info={"base_model": "tiny-qwen2"})
    assert main(["convert", str(tmp_path / "run"), "--output", str(tmp_path / "plain")]) == 0
    theirs = peft.PeftModel.from_pretrained(tiny("qwen2")[0], tmp_path / "plain")
    # float32 rounding only: W - s B0 A0 + s B A against W + s (B A - B0 A0), summed differently.
    torch.testing.assert_close(logits(theirs, batch), tuned, atol=1e-4, rtol=0)
    # A plain adapter needs no conversion; an existing output is not replaced unasked.
    plain = peftkit.apply(tiny("qwen2")[0], _config("kaiming"))
    peftkit.save(plain, tmp_path / "kaiming", info={"base_model": "tiny-qwen2"})
    assert main(["convert", str(tmp_path / "kaiming"), "--output", str(tmp_path / "k")]) == 2
    assert not (tmp_path / "k").exists()
    written = sorted(p.read_bytes() for p in (tmp_path / "plain").iterdir())
    assert main(["convert", str(tmp_path / "run"), "--output", str(tmp_path / "plain")]) == 2
    assert sorted(p.read_bytes() for p in (tmp_path / "plain").iterdir()) == written


def test_bad_inits_are_refused_before_anything_changes(tmp_path):
    with pytest.raises(ConfigError, match="Unknown LoRA init 'svd'; use one of: kaiming"):
        peftkit.LoraConfig(init="svd")
    with pytest.raises(ConfigError, match="Unknown LoRA init"):
        from_dict(peftkit.LoraConfig, {"init": "pisa"}, where="method 'lora'")
    with pytest.raises(ConfigError, match="loftq_iterations"):
        from_dict(peftkit.LoraConfig, {"init": "loftq", "loftq_iterations": 0})
    cases = [
        ("gpt2", _config("olora"), "cannot adapt GPT-2's Conv1D"),
        ("t5", _config("eva"), "encoder-decoder"),
    ]
    for family, config, message in cases:
        base = tiny(family)[0]
        before = {n: p.clone() for n, p in base.named_parameters()}
        with pytest.raises(ConfigError, match=message):
            peftkit.apply(base, config)
        assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())
    with pytest.raises(AdapterError, match="Only PiSSA- and OLoRA-initialised"):
        save_converted(peftkit.apply(tiny("llama")[0], _config("kaiming")), tmp_path / "x")
    dora = peftkit.apply(tiny("llama")[0], _config("pissa", use_dora=True))
    with pytest.raises(AdapterError, match="DoRA adapter cannot be converted"):
        save_converted(dora, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(ConfigError, match="ReLoRA re-initialises"):
        peftkit.ReLoraConfig(init="pissa")


def test_convert_needs_no_tokenizer_files_in_the_base_folder(tmp_path):
    # A base folder of weights and config.json alone: convert rewrites weights, so it loads no
    # tokenizer (it once ended in a traceback from AutoTokenizer).
    base, _ = tiny("llama")
    base.save_pretrained(tmp_path / "base")
    assert not [p for p in (tmp_path / "base").iterdir() if "token" in p.name]
    model, batch, _, _ = _trained("pissa", "llama")
    tuned = logits(model, batch)
    peftkit.save(model, tmp_path / "run" / "adapter", info={"base_model": "tiny-llama"})
    out = tmp_path / "plain"
    args = [
        "convert",
        str(tmp_path / "run"),
        "--model",
        str(tmp_path / "base"),
        "--output",
        str(out),
    ]
    assert main(args) == 0
    theirs = peft.PeftModel.from_pretrained(tiny("llama")[0], out)
    torch.testing.assert_close(logits(theirs, batch), tuned, atol=1e-4, rtol=0)
