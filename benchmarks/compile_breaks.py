"""Graph breaks under torch.compile, counted with torch._dynamo.explain (issue 33 item 3; the fast
path's own breaks since removed): one training forward (loss included) of a LoRA/DoRA model.

Arms: peftkit's fast path at dropout 0.05 and 0, DoRA on the fast path at dropout 0.05, the fast
path with the chunked causal-LM loss (models/chunked_loss.py), and PEFT's own forward (the fast
path uninstalled). Each model first runs one eager forward (the fast path records its sibling
layers there; it groups them and removes its hooks at the start of the next), then `explain`
traces one more. Prints graphs, breaks and the distinct break reasons.

    .venv/bin/python benchmarks/compile_breaks.py                      # tiny-llama, seconds
    .venv/bin/python benchmarks/compile_breaks.py --smoke --output /tmp/compile_breaks.json
"""

from __future__ import annotations

import collections
from typing import Any

from common import (
    base_parser,
    markdown_table,
    packed_lm_features,
    parse_with_smoke,
    setup,
    write_json,
)


def parse_args() -> Any:
    """Command-line flags."""
    parser = base_parser(__doc__.split("\n\n")[0], "tiny-llama")
    return parse_with_smoke(parser)  # the smoke run is the run itself: it is already small


def main() -> None:
    """Explain each arm and write the JSON."""
    args = parse_args()
    setup(args)
    import copy

    import torch
    import torch._dynamo

    import peftkit
    from peftkit.methods.lora import fast as lora_fast
    from peftkit.models import chunked_loss, load_model

    base, tokenizer = load_model(args.model, "causal-lm", seed=args.seed)
    feature = packed_lm_features(tokenizer, 2, 32)
    batch = {k: torch.tensor([f[k] for f in feature]) for k in feature[0]}
    arms = {
        "lora fast, dropout 0.05": (peftkit.LoraConfig(target_modules="all-linear"), True, False),
        "lora fast, dropout 0": (
            peftkit.LoraConfig(target_modules="all-linear", dropout=0.0), True, False),
        "dora fast, dropout 0.05": (peftkit.DoraConfig(target_modules="all-linear"), True, False),
        "lora fast + chunked loss": (peftkit.LoraConfig(target_modules="all-linear"), True, True),
        "peft forward, dropout 0.05": (
            peftkit.LoraConfig(target_modules="all-linear"), False, False),
    }  # fmt: skip
    results = {}
    for name, (config, fast, chunked) in arms.items():
        model = peftkit.apply(copy.deepcopy(base), config).train()
        if not fast:
            lora_fast.uninstall(model)
        head, _ = chunked_loss.find_head(model)

        def forward(model=model, chunked=chunked, head=head):  # noqa: ANN202
            if chunked:
                return chunked_loss.causal_lm_loss(model, head, dict(batch), None)
            return model(**batch).loss

        forward()  # eager: the fast path records its sibling layers (grouped as the next starts)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(forward)()
        reasons = collections.Counter(
            str(getattr(b, "reason", b)).split("\n")[0][:160] for b in explained.break_reasons
        )
        results[name] = {
            "graphs": explained.graph_count,
            "breaks": explained.graph_break_count,
            "ops": explained.op_count,
            "reasons": dict(reasons.most_common()),
        }
    rows = [[n, r["graphs"], r["breaks"], len(r["reasons"])] for n, r in results.items()]
    print(markdown_table(["arm", "graphs", "breaks", "distinct reasons"], rows))
    for name, result in results.items():
        print(f"\n{name}:")
        for reason, count in result["reasons"].items():
            print(f"  {count:3d}  {reason}")
    path = write_json("compile_breaks", args, results, args.output)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
