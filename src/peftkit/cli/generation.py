"""`peftkit generate`: a model, an adapter, or Proxy-Tuning."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from peftkit.cli.common import add_proxy_flags
from peftkit.io import write_json_atomically
from peftkit.run_folder import run_and_adapter


def _load_tuned(name: str, task: str, adapter: str | None) -> tuple[Any, Any]:
    """A model (with an adapter applied, if given) and its tokenizer."""
    import peftkit.api as api
    from peftkit.models import load_model

    model, tokenizer = load_model(name, task)
    if adapter:
        model = api.load(model, run_and_adapter(Path(adapter))[1])
    return model.eval(), tokenizer


def check_generate_args(args: argparse.Namespace) -> None:
    """Refuse bad `generate` numbers, prompts and flag combinations before any model loads."""
    from peftkit.decoding.generate import check_options
    from peftkit.decoding.proxy_options import check_alpha, check_proxy_flags
    from peftkit.errors import ConfigError

    check_options(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    empty = [i for i, prompt in enumerate(args.prompt) if not prompt]
    if empty:
        raise ConfigError(
            f"--prompt number {empty[0] + 1} is empty: give every prompt some text to continue."
        )
    proxy = check_proxy_flags(
        args.proxy_expert, args.proxy_anti_expert, args.proxy_adapter, args.expert_adapter
    )
    if args.alpha is not None:
        if not proxy:
            raise ConfigError(
                "--alpha sets Proxy-Tuning's strength: give --proxy-adapter, or --proxy-expert "
                "and --proxy-anti-expert, with it."
            )
        check_alpha(args.alpha)


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from a model, with an adapter, or proxy-tuned by an expert/anti-expert pair."""
    import peftkit.api as api
    from peftkit.decoding.generate import generate
    from peftkit.errors import ConfigError
    from peftkit.tasks.types import get_task_type

    # Numbers, prompts and flags first: a bad one should not cost a model load.
    check_generate_args(args)
    task = args.task
    if args.adapter and task is None:
        task = api.read_info(run_and_adapter(Path(args.adapter))[1]).get("task")
    task_type = get_task_type(task or "causal-lm")
    if not task_type.generates:
        raise ConfigError(
            f"A {task_type.name} model does not generate text; generate from a model tuned for "
            f"one of: {', '.join(_generative_tasks())}."
        )
    chat = args.chat or task_type.chat  # a chat-tuned adapter reads its prompts as it trained
    model, tokenizer = _load_tuned(args.model, task_type.name, args.adapter)
    options = {
        "max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
    }  # fmt: skip
    if args.proxy_adapter or args.proxy_expert:  # checked above: a whole setup or none
        from peftkit.decoding.proxy import WithoutAdapter, proxy_generate

        if args.proxy_adapter:  # one set of weights: expert = adapter on, anti-expert = off
            expert, _ = _load_tuned(args.model, task_type.name, args.proxy_adapter)
            anti_expert = WithoutAdapter(expert)
        else:
            expert, _ = _load_tuned(args.proxy_expert, task_type.name, args.expert_adapter)
            anti_expert, _ = _load_tuned(args.proxy_anti_expert, task_type.name, None)
        texts = proxy_generate(
            model, expert, anti_expert, tokenizer, args.prompt,
            alpha=1.0 if args.alpha is None else args.alpha,
            chat=chat, seed=args.seed, **options,
        )  # fmt: skip
    else:
        # One prompt at a time: sampled text then depends only on the seed and the prompt.
        generated = generate(
            model, tokenizer, args.prompt, chat=chat, batch_size=1, seed=args.seed, **options
        )
        texts = [g.text for g in generated]
    for prompt, text in zip(args.prompt, texts, strict=True):
        print(f"### {prompt}\n{text}\n")
    if args.output:
        records = [{"prompt": p, "generated": t} for p, t in zip(args.prompt, texts, strict=True)]
        write_json_atomically(args.output, records)
        print(f"wrote {args.output}")
    return 0


def _generative_tasks() -> list[str]:
    """The task types whose tuned models generate text."""
    from peftkit.tasks.types import TASK_TYPES

    return [name for name, task in TASK_TYPES.items() if task.generates]


def add_commands(commands: Any) -> None:
    """Add this module's subcommands to the parser."""

    generate = commands.add_parser(
        "generate", help="generate text: a model, an adapter, or Proxy-Tuning"
    )
    generate.add_argument("--model", required=True, help="base model: bundled name or folder")
    generate.add_argument("--adapter", help="a trained adapter (or run folder) to apply")
    generate.add_argument(
        "--task", help="the model's task type (default: the adapter's, else causal-lm)"
    )
    generate.add_argument("--prompt", action="append", required=True, help="repeatable")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--do-sample", action="store_true", help="sample instead of greedy")
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    generate.add_argument("--top-p", type=float, help="nucleus sampling mass")
    generate.add_argument("--seed", type=int, help="seed for sampling")
    generate.add_argument("--chat", action="store_true", help="use the chat template")
    add_proxy_flags(generate)
    generate.add_argument(
        "--alpha", type=float, help="Proxy-Tuning strength (default 1.0, as in the paper)"
    )
    generate.add_argument("--output", help="also write the generations as JSON here")
    generate.set_defaults(handler=cmd_generate)
