"""QLoRA on a 7B-shaped model on this CPU: a Llama built from Llama-2-7B's config with random
weights (no 7B checkpoint installs offline; memory does not depend on the values), its linear
layers NF4 computing in bf16, LoRA r 8 on q and v (float32 masters), batch 1 x 128 tokens,
gradient checkpointing, three AdamW steps; the measured peak beside `peftkit estimate` for the
same settings and beside the estimate for full fine-tuning.

The float32 weights (27 GB) are never held: the model is built on the meta device and each
linear layer is drawn and quantised one at a time (peftkit.models.quantize.quantize_layers);
the embeddings, norms and output layer are then drawn in bf16 and the rotary tables rebuilt.

Memory: the tensor peak (the weights plus the running peak of every allocation and free during
the steps, from the torch profiler: what the estimate counts), and the process's resident
high-water mark (VmHWM: everything, Python, libraries and the allocator's slack included) and
its level before the first step, all in GiB.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/lowbit_7b.py
    .venv/bin/python benchmarks/lowbit_7b.py --layers 2 --steps 1     # smoke: a 2-layer 7B slice
"""

from __future__ import annotations

from typing import Any

from common import base_parser, clock, parse_with_smoke, setup, write_json

GIB = 2**30


def parse_args() -> Any:
    """Command-line flags."""
    parser = base_parser(__doc__.split("\n\n")[0], "llama-7b")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (a smoke run)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens in the one sequence")
    parser.add_argument("--steps", type=int, default=3, help="AdamW steps")
    return parse_with_smoke(parser, model="tiny-llama", steps=1, seq_len=8)


def resident_gib(field: str = "VmRSS") -> float:
    """The process's resident set (VmRSS) or its high-water mark (VmHWM), in GiB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError(f"no {field} in /proc/self/status")


def build(config: Any, seed: int) -> Any:
    """The model in NF4 (bf16 compute), never holding more than one linear layer in float."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from peftkit.models.quantize import quantize_layers

    generator = torch.Generator().manual_seed(seed)
    std = config.initializer_range

    def draw(name: str, layer: nn.Module) -> torch.Tensor:
        shape = (layer.out_features, layer.in_features)
        return (torch.randn(shape, generator=generator) * std).to(torch.bfloat16)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    quantize_layers(model, "nf4", torch.bfloat16, make_weight=draw)
    for name, parameter in list(model.named_parameters()):
        if not parameter.is_meta:
            continue
        module_name, _, attribute = name.rpartition(".")
        if "norm" in name:
            value = torch.ones(parameter.shape, dtype=torch.bfloat16)
        else:
            value = (torch.randn(parameter.shape, generator=generator) * std).bfloat16()
        setattr(model.get_submodule(module_name), attribute, nn.Parameter(value, False))
    if model.config.tie_word_embeddings:
        model.tie_weights()
    rotary = type(model.model.rotary_emb)
    model.model.rotary_emb = rotary(config=config)  # its tables are buffers computed at init
    return model.requires_grad_(False)


def estimates(args: Any, layers: int | None) -> dict[str, Any]:
    """peftkit estimate for the same settings, and for full fine-tuning (bf16 mixed and fp32)."""
    from peftkit.memory import meta
    from peftkit.memory.estimate import estimate

    config = meta.resolve_config(args.model)[0]
    if layers is not None:
        config.num_hidden_layers = layers
    lora = {"name": "lora", "rank": 8, "target_modules": ["q_proj", "v_proj"]}
    # the measured steps compute the model's own loss over the whole logits: so do these
    qlora = estimate(config, lora, 1, args.seq_len, "fp32", True, quantization="nf4",
                     base_dtype="bf16", chunked_loss=False)  # fmt: skip
    full_mixed = estimate(config, "full", 1, args.seq_len, "bf16-mixed", True, chunked_loss=False)
    full_fp32 = estimate(config, "full", 1, args.seq_len, "fp32", True, chunked_loss=False)
    return {"qlora": qlora.as_dict(), "full_bf16_mixed": full_mixed.as_dict(),
            "full_fp32": full_fp32.as_dict()}  # fmt: skip


def main() -> None:
    """Build, train --steps steps, measure, compare with the estimates, write the JSON."""
    args = parse_args()
    setup(args)
    import torch
    from torch.profiler import ProfilerActivity, profile

    import peftkit
    from peftkit.memory import meta
    from peftkit.models.precision import stored_bytes, weight_count
    from peftkit.training.gradient_checkpointing import enable_gradient_checkpointing
    from peftkit.training.memory_probe import peak_of_allocations

    config = meta.resolve_config(args.model)[0]
    if args.layers is not None:
        config.num_hidden_layers = args.layers
    import transformers  # noqa: F401 - loaded before the baseline is read

    libraries = resident_gib()  # Python, torch, transformers, bitsandbytes: before any tensor
    start = clock()
    model = build(config, args.seed)
    build_seconds = clock() - start
    enable_gradient_checkpointing(model)
    model = peftkit.apply(model, peftkit.LoraConfig(rank=8, target_modules=["q_proj", "v_proj"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    tokens = torch.randint(0, config.vocab_size, (1, args.seq_len), generator=torch.Generator())
    before = resident_gib()
    model.train()
    seconds, losses = [], []
    # Every allocation and free of the steps, in time order: their running peak plus the weights
    # is the tensor peak, what the estimate counts (the resident set adds the allocator's slack).
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        for _ in range(args.steps):
            begin = clock()
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds.append(clock() - begin)
            losses.append(float(loss.detach()))
            print(f"step {len(seconds)}: {seconds[-1]:.1f} s, loss {losses[-1]:.3f}", flush=True)
    peak = resident_gib("VmHWM")
    events = sorted(
        (e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    tensor_peak = (stored_bytes(model) + peak_of_allocations([e.nbytes() for e in events])) / GIB
    found = estimates(args, args.layers)
    results = {
        "layers": config.num_hidden_layers,
        "parameters": sum(weight_count(p) for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "trainable_dtypes": sorted({str(p.dtype) for p in trainable}),
        "weight_gib": stored_bytes(model) / GIB,
        "build_seconds": build_seconds,
        "step_seconds": seconds,
        "losses": losses,
        "resident_libraries_gib": libraries,
        "resident_before_training_gib": before,
        "peak_resident_gib": peak,
        "peak_less_libraries_gib": peak - libraries,
        "estimate_qlora_gib": found["qlora"]["gib"]["total"],
        "estimate_full_bf16_mixed_gib": found["full_bf16_mixed"]["gib"]["total"],
        "estimate_full_fp32_gib": found["full_fp32"]["gib"]["total"],
        "peak_less_libraries_over_estimate": (peak - libraries) / found["qlora"]["gib"]["total"],
        "tensor_peak_gib": tensor_peak,
        "tensor_peak_over_estimate": tensor_peak / found["qlora"]["gib"]["total"],
        "estimates": found,
    }
    for key in ("weight_gib", "resident_libraries_gib", "resident_before_training_gib",
                "peak_resident_gib", "peak_less_libraries_gib", "estimate_qlora_gib",
                "estimate_full_bf16_mixed_gib", "estimate_full_fp32_gib",
                "peak_less_libraries_over_estimate", "tensor_peak_gib",
                "tensor_peak_over_estimate"):  # fmt: skip
        print(f"{key:>30}: {results[key]:.2f}")
    name = "lowbit_7b" if args.layers is None else f"lowbit_7b_{args.layers}layers"
    print(f"wrote {write_json(name, args, results, args.output)}")


if __name__ == "__main__":
    main()
