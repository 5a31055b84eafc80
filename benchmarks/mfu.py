"""Model FLOP utilisation per method: training FLOP/s achieved divided by a matrix-multiply peak
measured on the same machine, in the same process, with the same threads and dtype.

Training FLOPs per token (Kaplan et al., 2020; Chinchilla's appendix F): N is every parameter of
a matrix multiply (the linear layers and the output layer, the tied embedding counted once as the
output layer; the input embedding lookup is no multiply). Full fine-tuning costs 6N a token:
forward 2N, backward 2N for input gradients and 2N for weight gradients. With a frozen base
(LoRA, BitFit) the weight gradients of the frozen matrices are not computed: 4N (the adapters'
own FLOPs, r (in + out) per adapted layer, are under 1% and left out, which makes the LoRA figure
slightly conservative). BitFit's bias gradients are sums, not multiplies: 4N too. Attention
score FLOPs (12 L s d a token for training, Chinchilla's count) are added to every method, since
their backward runs either way. The peak is the best of several square fp32 GEMMs.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/mfu.py          # smollm2-135m
    .venv/bin/python benchmarks/mfu.py --model tiny-llama --steps 2 --rounds 1
"""

from __future__ import annotations

import copy
from typing import Any

from common import (
    add_step_flags,
    base_parser,
    batches_of,
    clock,
    interleaved,
    markdown_table,
    median,
    parse_with_smoke,
    setup,
    timed,
    write_json,
)


def parse_args() -> Any:
    """Command-line flags."""
    parser = base_parser(__doc__.split("\n\n")[0], "smollm2-135m")
    add_step_flags(parser, steps=1, rounds=2, batch_size=4, seq_len=256)
    parser.add_argument(
        "--gemm-sizes", default="1024,2048,3072", help="square GEMM sizes for the peak"
    )
    return parse_with_smoke(
        parser, model="tiny-llama", steps=1, rounds=1, seq_len=16, gemm_sizes="64"
    )


def gemm_peak(sizes: list[int], repeats: int = 5) -> dict[str, Any]:
    """The best fp32 matrix-multiply rate over square sizes: FLOP/s (2 n^3 per product)."""
    import torch

    rates = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm up: thread pool, caches
        best = float("inf")
        for _ in range(repeats):
            start = clock()
            torch.mm(a, b)
            best = min(best, clock() - start)
        rates[n] = 2 * n**3 / best
    return {"flops_per_second": max(rates.values()), "by_size": rates}


def matmul_parameters(model: Any) -> int:
    """N: the weights of every matrix multiply (linear layers and the output layer, once)."""
    from torch import nn

    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return total


def attention_flops_per_token(config: Any, seq_len: int) -> int:
    """Training FLOPs of attention scores and mixing a token: 3 x (2 x 2 L s d) = 12 L s d."""
    return 12 * config.num_hidden_layers * seq_len * config.hidden_size


def method_models(model: Any) -> dict[str, tuple[Any, int]]:
    """{method: (model to train, FLOPs factor per matmul parameter)}: full 6, LoRA 4, BitFit 4
    (LoRA at peftkit's default dropout and at 0)."""
    import peftkit
    from peftkit.methods.bitfit import BitFitConfig

    full = copy.deepcopy(model).requires_grad_(True)
    lora = peftkit.apply(copy.deepcopy(model), "lora", target_modules="all-linear")
    # the same adapters without dropout: how much of LoRA's cost the dropout masks still are
    plain = peftkit.apply(copy.deepcopy(model), "lora", target_modules="all-linear", dropout=0.0)
    # Llama-style models have no biases: BitFit then adds zero ones (see docs/methods/bitfit.md).
    bitfit = peftkit.apply(copy.deepcopy(model), BitFitConfig(missing_biases="add"))
    return {
        "full": (full, 6),
        "lora": (lora, 4),
        "lora_dropout_0": (plain, 4),
        "bitfit": (bitfit, 4),
    }


def step_function(model: Any, batch: dict) -> Any:
    """A function timing `count` AdamW steps on one batch."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    model.train()

    def step() -> None:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # allocates AdamW state: not timed
    return step


def main() -> None:
    """Measure the GEMM peak, time each method, print MFU per method, write JSON."""
    args = parse_args()
    setup(args)

    from peftkit.models import load_model

    model, tokenizer = load_model(args.model, "causal-lm", seed=args.seed)
    batch = batches_of(tokenizer, args.batch_size, args.seq_len, 1)[0]
    n = matmul_parameters(model)
    attention = attention_flops_per_token(model.config, args.seq_len)
    peak_before = gemm_peak([int(s) for s in args.gemm_sizes.split(",")])
    models = method_models(model)
    steps = {name: step_function(m, batch) for name, (m, _) in models.items()}

    seconds = interleaved({name: timed(s, args.steps) for name, s in steps.items()}, args.rounds)
    peak_after = gemm_peak([int(s) for s in args.gemm_sizes.split(",")])
    # The machine is shared: take the better of the two peak measurements, a stricter denominator.
    peak = max(peak_before["flops_per_second"], peak_after["flops_per_second"])
    tokens = args.batch_size * args.seq_len
    results, rows = [], []
    for name, (_, factor) in models.items():
        step = median(seconds[name])
        flops = factor * n * tokens + attention * tokens
        mfu = flops / step / peak
        results.append({"method": name, "flops_per_token": flops / tokens, "factor": factor,
                        "median_step_seconds": step, "tokens_per_second": tokens / step,
                        "achieved_flops_per_second": flops / step, "mfu": mfu,
                        "step_seconds": seconds[name]})  # fmt: skip
        rows.append([name, f"{factor}N + attn", f"{tokens / step:.0f}",
                     f"{flops / step / 1e9:.1f}", f"{mfu * 100:.1f}%"])  # fmt: skip
    print(f"{args.model}: N = {n:,} matmul parameters, batch {args.batch_size} x {args.seq_len}, "
          f"fp32, {args.threads} threads; GEMM peak {peak / 1e9:.1f} GFLOP/s "
          f"(before {peak_before['flops_per_second'] / 1e9:.1f}, "
          f"after {peak_after['flops_per_second'] / 1e9:.1f})")  # fmt: skip
    print(markdown_table(["method", "FLOPs/token", "tokens/s", "GFLOP/s", "MFU"], rows))
    summary = {"matmul_parameters": n, "attention_flops_per_token": attention,
               "peak_flops_per_second": peak, "peak_before": peak_before,
               "peak_after": peak_after, "methods": results}  # fmt: skip
    print(f"wrote {write_json('mfu', args, summary, args.output)}")


if __name__ == "__main__":
    main()
