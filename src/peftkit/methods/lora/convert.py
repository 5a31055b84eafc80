"""A PiSSA- or OLoRA-initialised adapter rewritten for the original base model, with PEFT's own
conversion (`save_pretrained(path_initial_model_for_weight_conversion=...)`).

Such an adapter trains on the residual base W - s B0 A0. After training the model is
W - s B0 A0 + s B A = W + s (B A - B0 A0), which is a plain LoRA of rank 2r on the unchanged W:
B' = [B, B0], A' = [A; -A0] (PEFT doubles r and alpha, so the scale stays s). The converted
folder loads onto the original base anywhere (PEFT, vLLM, `peftkit combine`), and combines with
other adapters; the unconverted one loads only where the init is run again (peftkit, PEFT)."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from peftkit import io
from peftkit.errors import AdapterError
from peftkit.method import Conversion
from peftkit.methods.lora.init import ADAPTER, changes_base, initial_factors


def check_convertible(model: nn.Module) -> None:
    """Refuse models whose adapter PEFT's conversion would get wrong or cannot express."""
    peft_config = getattr(model, "peft_config", {}).get(ADAPTER)
    init = getattr(peft_config, "init_lora_weights", None)
    if init not in ("pissa", "olora"):
        raise AdapterError(
            f"Only PiSSA- and OLoRA-initialised adapters need converting (this one: {init!r}): "
            "save it as it is. A LoftQ adapter belongs to its quantised base; merge it instead."
        )
    if peft_config.use_dora:
        raise AdapterError(
            "A DoRA adapter cannot be converted: its magnitude vector was fitted to the residual "
            "base, and a plain LoRA on the original base cannot express it. Merge it instead."
        )
    if not initial_factors(model):
        raise AdapterError(
            "This model has no recorded initial factors: apply or load it with peftkit "
            "(peftkit.apply, peftkit.load), which records them, then convert."
        )


def save_converted(
    model: nn.Module, folder: str | Path, info: dict[str, Any] | None = None
) -> Path:
    """Write the adapter as a plain LoRA of rank 2r for the original base (atomically)."""
    check_convertible(model)
    with tempfile.TemporaryDirectory() as scratch:
        # PEFT reads the initial adapter from a folder: A0, B0 under its key names, default init.
        initial = Path(scratch) / "initial"
        start = copy.deepcopy(model.peft_config[ADAPTER])
        start.init_lora_weights = True
        start.save_pretrained(str(initial))
        tensors = {}
        for name, (a0, b0, _, _) in initial_factors(model).items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = a0.contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = b0.contiguous()
        save_file(tensors, str(initial / io.WEIGHTS_NAME))
        converted = Path(scratch) / "converted"
        model.save_pretrained(str(converted), path_initial_model_for_weight_conversion=str(initial))
        files: dict[str, Any] = {
            io.CONFIG_NAME: io.read_json(converted / io.CONFIG_NAME, io.CONFIG_NAME),
            io.WEIGHTS_NAME: io.read_tensors(converted),
        }
    if info is not None:
        files[io.PEFTKIT_INFO_NAME] = info
    return io.write_folder_atomically(folder, files)


def needs_conversion(saved: dict[str, Any]) -> bool:
    """Whether a LoRA adapter_config.json describes an init that rewrote the base it trained on
    (PiSSA in any form, OLoRA, CorDA, LoRA-GA): such an adapter converts for the original base.
    LoftQ's does not: it belongs to its quantised base."""
    init = saved.get("init_lora_weights")
    return changes_base(init) and init != "loftq"


CONVERSION = Conversion(needed=needs_conversion, write=save_converted)
