"""How much the bundled MiniLM's first token and its mean-pooled states carry about the reviews
task: a logistic regression on frozen features of each (the README's pooling figure).

all-MiniLM-L6-v2 was trained on mean-pooled token states (its 1_Pooling/config.json), while
transformers' BertForSequenceClassification classifies from the first token. This embeds the first
`--train` training reviews and the first `--test` test reviews (cut to `--max-length` tokens) with
the frozen encoder, fits scikit-learn's LogisticRegression (max_iter 2000, default C) on each
feature kind, and reports test accuracy beside the majority class's.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/pooling_probe.py   # minilm
    .venv/bin/python benchmarks/pooling_probe.py --smoke                         # tiny-bert
"""

from __future__ import annotations

from typing import Any

from common import base_parser, markdown_table, parse_with_smoke, setup, write_json


def parse_args() -> Any:
    """Command-line flags."""
    parser = base_parser(__doc__.split("\n\n")[0], "minilm")
    parser.add_argument("--train", type=int, default=600, help="training reviews embedded")
    parser.add_argument("--test", type=int, default=400, help="test reviews embedded")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per review")
    parser.add_argument("--batch-size", type=int, default=32, help="reviews per forward")
    return parse_with_smoke(parser, model="tiny-bert", train=24, test=16, max_length=16)


def features(encoder: Any, tokenizer: Any, texts: list[str], args: Any) -> dict[str, Any]:
    """First-token and masked-mean last hidden states of the frozen encoder, as numpy arrays."""
    import numpy as np
    import torch

    first, mean = [], []
    with torch.no_grad():
        for start in range(0, len(texts), args.batch_size):
            chunk = texts[start : start + args.batch_size]
            batch = tokenizer(chunk, truncation=True, max_length=args.max_length, padding=True,
                              return_tensors="pt")  # fmt: skip
            states = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            first.append(states[:, 0].numpy())
            mean.append(((states * mask).sum(1) / mask.sum(1)).numpy())
    return {"first token": np.concatenate(first), "mean pooled": np.concatenate(mean)}


def main() -> None:
    """Embed, fit one probe per feature kind, print and save the accuracies."""
    args = parse_args()
    setup(args)
    from sklearn.linear_model import LogisticRegression

    from peftkit.data.bundled import amazon_reviews
    from peftkit.models import load_model

    model, tokenizer = load_model(args.model, "classification", num_labels=2, seed=args.seed)
    encoder = model.base_model.eval()  # the encoder under the classification head
    train_rows, test_rows = amazon_reviews()
    train, test = list(train_rows)[: args.train], list(test_rows)[: args.test]
    labels = {name: [str(row["label"]) for row in rows] for name, rows in
              (("train", train), ("test", test))}  # fmt: skip
    train_x = features(encoder, tokenizer, [str(r["text"]) for r in train], args)
    test_x = features(encoder, tokenizer, [str(r["text"]) for r in test], args)
    majority = max(set(labels["train"]), key=labels["train"].count)
    results: dict[str, Any] = {
        "majority_class_accuracy": sum(y == majority for y in labels["test"]) / len(test),
        "train_rows": len(train), "test_rows": len(test),
    }  # fmt: skip
    for kind in train_x:
        probe = LogisticRegression(max_iter=2000).fit(train_x[kind], labels["train"])
        results[kind] = float(probe.score(test_x[kind], labels["test"]))
    rows = [[kind, f"{results[kind]:.3f}"] for kind in ("first token", "mean pooled")]
    rows.append(["majority class", f"{results['majority_class_accuracy']:.3f}"])
    print(f"{args.model}, frozen, {len(train)} training / {len(test)} test reviews, "
          f"{args.max_length} tokens")  # fmt: skip
    print(markdown_table(["features", "test accuracy"], rows))
    print(f"wrote {write_json('pooling_probe', args, results, args.output)}")


if __name__ == "__main__":
    main()
