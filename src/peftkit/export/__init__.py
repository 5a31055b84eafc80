"""Export a tuned model as one GGUF file for llama.cpp (and any GGUF reader): its adapter merged
into the base weights, the tokenizer included. Llama, Qwen2 and GPT-2; f32, f16 or q8_0.

    from peftkit.export import export_gguf, load_source
    source = load_source("runs/my-run")          # merges the run's adapter on the fly
    export_gguf(source.model, source.tokenizer, "my-run.f16.gguf", outtype="f16")
"""

from peftkit.export.architectures import ARCHITECTURES, architecture_for
from peftkit.export.gguf_file import export_gguf
from peftkit.export.source import ExportSource, load_source
from peftkit.export.tensors import OUTTYPES

__all__ = [
    "ARCHITECTURES", "OUTTYPES", "ExportSource", "architecture_for", "export_gguf", "load_source"
]  # fmt: skip
