"""`peftkit export`: a merged model written for other runtimes (GGUF for llama.cpp)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_export(args: argparse.Namespace) -> int:
    """Write a model (an adapter merged on the fly, or a merged model) as one GGUF file."""
    from peftkit.errors import ExportError

    if args.format != "gguf":
        raise ExportError(f"Unknown export format '{args.format}'; peftkit exports gguf.")
    from peftkit.export import export_gguf, load_source
    from peftkit.export.gguf_file import check_output
    from peftkit.export.tensors import check_outtype
    from peftkit.tables import key_value_table

    check_outtype(args.outtype)  # both refused before the model is loaded
    check_output(Path(args.output), args.overwrite)
    source = load_source(args.source, args.model)
    report = export_gguf(
        source.model, source.tokenizer, args.output, outtype=args.outtype, name=source.name,
        overwrite=args.overwrite, tokenizer_pre=args.tokenizer_pre,
    )  # fmt: skip
    types = ", ".join(f"{count} {kind}" for kind, count in sorted(report["tensors"].items()))
    print(key_value_table([
        ("source", source.description),
        ("file", report["path"]),
        ("architecture", report["architecture"]),
        ("tensors", types),
        ("output tied to token_embd", "yes" if report["tied_output"] else "no"),
        ("vocabulary", f"{report['vocabulary']} (pre-tokenizer {report['tokenizer_pre']})"),
        ("chat template", "yes" if report["chat_template"] else "no"),
        ("size", f"{report['bytes'] / 2**20:.1f} MiB"),
    ]))  # fmt: skip
    return 0


def add_commands(commands: Any) -> None:
    """Add this module's subcommands to the parser."""

    export = commands.add_parser(
        "export", help="write a model or a merged adapter as one GGUF file (llama.cpp)"
    )
    export.add_argument(
        "source",
        help="a run or adapter folder (merged on the fly), a merged-model folder, or a model name",
    )
    export.add_argument("--format", default="gguf", help="file format (gguf)")
    export.add_argument(
        "--outtype", default="f16",
        help="storage of the weight matrices: f32 | f16 (default) | q8_0 (norms stay f32)",
    )  # fmt: skip
    export.add_argument("--output", required=True, help="the .gguf file to write")
    export.add_argument("--overwrite", action="store_true", help="replace an existing file")
    export.add_argument("--model", help="an adapter's base model (default: the one it names)")
    export.add_argument(
        "--tokenizer-pre",
        help="llama.cpp's pre-tokenizer name, for a tokenizer the exporter does not recognise",
    )
    export.set_defaults(handler=cmd_export)
