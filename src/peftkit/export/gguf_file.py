"""Write one GGUF file: the model's metadata, tokenizer and tensors, through a temporary file and a
rename, so an interrupted export never leaves a half-written file (nor replaces one unasked)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
from torch import nn

from peftkit.errors import ExportError
from peftkit.export.architectures import architecture_for
from peftkit.export.tensors import (
    OUTTYPES,
    check_outtype,
    check_plain_model,
    gguf_tensors,
    output_embedding_name,
)
from peftkit.export.tokenizer import tokenizer_metadata, write_tokenizer
from peftkit.io import atomic_file


class _GgufWriter(gguf.GGUFWriter):
    """gguf's writer, except that it also writes an empty array: a byte-level vocabulary without
    merges (the tiny test models') has an empty merge list, and llama.cpp requires the key. The
    format allows a count of 0; the package alone refuses it."""

    def _pack_val(
        self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool, sub_type: Any = None
    ) -> bytes:
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            kind = self._pack("I", vtype) if add_vtype else b""
            return kind + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse to replace an existing file unless asked to, before any slow work."""
    if output.is_dir():
        raise ExportError(f"{output} is a folder; --output names the .gguf file to write.")
    if output.exists() and not overwrite:
        raise ExportError(f"{output} exists; pass --overwrite to replace it, or another --output.")


def _write_atomically(writer: gguf.GGUFWriter, output: Path, overwrite: bool) -> None:
    """Write the file beside its destination, then move it in place by a rename."""
    with atomic_file(output) as staging:
        writer.write_header_to_file(path=staging)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        check_output(output, overwrite)  # a file that appeared meanwhile is not replaced unasked


def export_gguf(
    model: nn.Module,
    tokenizer: Any,
    output: str | Path,
    outtype: str = "f16",
    name: str | None = None,
    overwrite: bool = False,
    tokenizer_pre: str | None = None,
) -> dict[str, Any]:
    """Write a plain transformers causal LM and its tokenizer as one GGUF file; returns a summary
    (path, architecture, types, sizes)."""
    output = Path(output)
    check_outtype(outtype)
    check_output(output, overwrite)
    arch = architecture_for(model)
    check_plain_model(model)
    config = model.config
    vocab = tokenizer_metadata(tokenizer, config.vocab_size, pre=tokenizer_pre)

    writer = _GgufWriter(path=None, arch=arch.gguf_name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or getattr(config, "_name_or_path", "") or arch.model_type)
    writer.add_file_type(OUTTYPES[outtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    arch.write_metadata(writer, config)
    write_tokenizer(writer, vocab)
    stored: dict[str, int] = {}
    for tensor in gguf_tensors(model, arch, outtype):
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.qtype)
        stored[tensor.qtype.name] = stored.get(tensor.qtype.name, 0) + 1
    _write_atomically(writer, output, overwrite)
    return {
        "path": str(output),
        "architecture": arch.gguf_name,
        "outtype": outtype,
        "tensors": stored,
        "tied_output": output_embedding_name(model) is not None,
        "vocabulary": len(vocab.tokens),
        "tokenizer_pre": vocab.pre,
        "chat_template": vocab.chat_template is not None,
        "bytes": output.stat().st_size,
    }
