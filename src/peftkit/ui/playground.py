"""The Playground without the page: a base model and one or more adapters of the workspace, greedy
text from the base, from the tuned model, and proxy-tuned, through the same decoding code as
`peftkit generate` (decoding/generate.py, decoding/proxy.py).

The tuned model is a second copy of the base with the adapters loaded. Several LoRA-family
adapters are mixed with weights through the composition tools' exact `cat` combination (the sum of
the weighted updates); one adapter of any other method is loaded as it is, without a weight.
Proxy-Tuning steers the base with alpha * (tuned - untuned), the untuned being the tuned copy with
its adapters switched off (`--proxy-adapter` of `peftkit generate`): alpha 0 gives the base's text,
alpha 1 the tuned model's, and larger values push further the same way."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftkit.errors import AdapterError, ConfigError, PeftkitError
from peftkit.ui.workspace import Workspace

MIX = "ui-mix"  # the name of the weighted combination among the loaded adapters


@dataclass
class Loaded:
    """The models the Playground holds: base, tuned copy, and what the tuned copy carries."""

    key: tuple[str, tuple[str, ...]]
    base: Any
    tokenizer: Any
    tuned: Any
    chat: bool  # the adapters were trained on chat: prompts go through the chat template
    # The method's composition capability where the adapters mix with weights (LoRA family);
    # None: one adapter of another method, loaded as it is.
    composition: Any
    switch_off: Any  # the method's switch-off capability (None: the proxy column cannot run)
    weights: tuple[float, ...] | None = None  # the weights of the current mix
    notes: list[str] = field(default_factory=list)


def _task_of(folders: dict[str, Path]) -> str:
    """The task the adapters were trained for (they must agree, and it must generate text)."""
    import peftkit.api as api
    from peftkit.tasks.types import get_task_type

    tasks = {api.read_info(folder).get("task") or "causal-lm" for folder in folders.values()}
    if len(tasks) > 1:
        raise ConfigError(f"The adapters were trained for different tasks ({sorted(tasks)}).")
    task = get_task_type(tasks.pop() if tasks else "causal-lm")
    if not task.generates:
        raise ConfigError(f"A {task.name} adapter does not generate text; choose generative ones.")
    return task.name


class Playground:
    """Loads models on demand (kept until the choice changes) and generates from them."""

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self.loaded: Loaded | None = None
        self.lock = threading.Lock()  # one generation at a time: the models are shared

    def load(self, model: str, adapters: list[str]) -> Loaded:
        """The base model and the tuned copy carrying the adapters (reloaded only on change)."""
        if not adapters:
            raise ConfigError("Choose at least one adapter (a finished run of the workspace).")
        key = (model, tuple(adapters))
        if self.loaded is not None and self.loaded.key == key:
            return self.loaded
        self.loaded = None  # free the previous models before loading others
        available = self.workspace.adapters()
        missing = [name for name in adapters if name not in available]
        if missing:
            raise ConfigError(f"No finished run with an adapter: {missing}.")
        folders = {name: available[name] for name in adapters}
        self.loaded = self._load(key, self.workspace.model(model), folders)
        return self.loaded

    def _load(self, key: Any, model: str, folders: dict[str, Path]) -> Loaded:
        """Load base and tuned copy; mixable adapters through the composition tools."""
        import peftkit.api as api
        from peftkit import io, registry
        from peftkit.models import load_model
        from peftkit.tasks.types import get_task_type

        task = _task_of(folders)
        methods = {
            name: registry.method_for_saved(io.read_json(f / io.CONFIG_NAME, io.CONFIG_NAME))
            for name, f in folders.items()
        }
        compositions = {id(m.composition) for m in methods.values()}
        composition = next(iter(methods.values())).composition
        if len(folders) > 1 and (composition is None or len(compositions) > 1):
            mixing = [m.name for m in registry.METHODS if m.composition is not None]
            raise AdapterError(
                f"These adapters do not mix ({ {n: m.name for n, m in methods.items()} }): "
                f"choose adapters of one method family that combines ({', '.join(mixing)}), "
                "or one."
            )
        base, tokenizer = load_model(model, task)
        copy, _ = load_model(model, task)
        notes = []
        if composition is not None:
            tuned = composition.load(copy, {n: str(f) for n, f in folders.items()})
        else:
            tuned = api.load(copy, next(iter(folders.values())))
            notes.append(f"weights do not apply: {methods[next(iter(folders))].name} adapters "
                         "do not combine")  # fmt: skip
        chat = get_task_type(task).chat
        switch_off = methods[next(iter(folders))].switch_off
        return Loaded(key, base.eval(), tokenizer, tuned.eval(), chat, composition, switch_off,
                      notes=notes)  # fmt: skip

    def _mix(self, loaded: Loaded, weights: list[float]) -> None:
        """Make the tuned copy's active adapter the weighted sum of the loaded ones."""
        composition = loaded.composition
        if composition is None or loaded.weights == tuple(weights):
            return
        names = [name for name in composition.names(loaded.tuned) if name != MIX]
        composition.activate(loaded.tuned, names[0])
        if MIX in composition.names(loaded.tuned):
            composition.delete(loaded.tuned, MIX)
        composition.combine(loaded.tuned, names, list(weights), MIX, how="cat")
        composition.activate(loaded.tuned, MIX)
        loaded.weights = tuple(weights)

    def generate(
        self,
        model: str,
        adapters: list[str],
        prompt: str,
        weights: list[float],
        alpha: float,
        max_new_tokens: int,
        which: tuple[str, ...] = ("base", "tuned", "proxy"),
    ) -> dict[str, str]:
        """Greedy continuations of `prompt`: the base's, the tuned copy's (adapters mixed with
        `weights`) and the proxy-tuned base's at `alpha`; an error in one says so in its place."""
        from peftkit.decoding.generate import check_options, generate
        from peftkit.decoding.proxy import WithoutAdapter, check_alpha, proxy_generate

        if not prompt.strip():
            raise ConfigError("Write a prompt to continue.")
        check_options(int(max_new_tokens), 1.0, None, None)
        check_alpha(alpha)
        with self.lock:
            loaded = self.load(model, adapters)
            self._mix(loaded, weights[: len(adapters)])
            options = {"max_new_tokens": int(max_new_tokens), "chat": loaded.chat}
            texts = {}
            for role in which:
                try:
                    if role == "proxy":
                        anti_expert = WithoutAdapter(loaded.tuned, loaded.switch_off)
                        texts[role] = proxy_generate(
                            loaded.base, loaded.tuned, anti_expert, loaded.tokenizer, [prompt],
                            alpha=alpha, **options,
                        )[0]  # fmt: skip
                    else:
                        chosen = loaded.base if role == "base" else loaded.tuned
                        texts[role] = generate(chosen, loaded.tokenizer, [prompt], batch_size=1,
                                               **options)[0].text  # fmt: skip
                except PeftkitError as error:
                    texts[role] = f"peftkit: error: {error}"
            return texts
