"""The Playground page: a base model and adapters of the workspace, base and tuned text side by
side, and the two knobs whose effect is best seen by moving them: Proxy-Tuning's alpha and the
weights of a LoRA combination. Decoding is greedy, so a change of text is the knob's doing; each
slider regenerates when let go."""

from __future__ import annotations

from typing import Any

import gradio as gr

from peftkit.ui.playground import Playground
from peftkit.ui.widgets import guarded
from peftkit.ui.workspace import Workspace

MAX_ADAPTERS = 4  # weight sliders on the page (one per chosen adapter)
ROLES = ("base", "tuned", "proxy")


def _recorded_base(workspace: Workspace, chosen: list[str]) -> Any:
    """The base model the first chosen adapter names (the page's base then follows it)."""
    import peftkit.api as api

    folder = workspace.adapters().get(chosen[0]) if chosen else None
    recorded = api.read_info(folder).get("base_model") if folder is not None else None
    return gr.update(value=recorded) if recorded else gr.update()


def build(workspace: Workspace, shown: list[Any]) -> None:
    """The page's widgets and events (inside a gr.Tab); `shown` are the events that show it (the
    page loading, its tab chosen), on which the workspace's adapters are read again."""
    from peftkit.models import bundled_names

    playground = Playground(workspace)
    with gr.Row():
        model = gr.Dropdown(bundled_names(), value="smollm2-135m", allow_custom_value=True,
                            label="base model", elem_id="play-model",
                            info="a bundled model, or a model folder in the workspace")  # fmt: skip
        adapters = gr.Dropdown([], multiselect=True,
                               label=f"adapters (up to {MAX_ADAPTERS})",
                               elem_id="play-adapters")  # fmt: skip
        refresh = gr.Button("Refresh runs", elem_id="play-refresh", scale=0)
    prompt = gr.Textbox(label="prompt", lines=2, elem_id="play-prompt")
    with gr.Row():
        max_new_tokens = gr.Number(32, precision=0, label="max new tokens", elem_id="play-max")
        alpha = gr.Slider(-1.0, 3.0, value=1.0, step=0.1, label="Proxy-Tuning alpha",
                          info="base + alpha (tuned - untuned)", elem_id="play-alpha")  # fmt: skip
    with gr.Row():
        weights = [gr.Slider(-1.0, 2.0, value=1.0, step=0.05, label=f"weight {i + 1}",
                             visible=False, elem_id=f"play-weight-{i + 1}")
                   for i in range(MAX_ADAPTERS)]  # fmt: skip
    generate_button = gr.Button("Generate", variant="primary", elem_id="play-generate")
    status = gr.Markdown(elem_id="play-status")
    with gr.Row(equal_height=True):
        outputs = {role: gr.Textbox(label=label, lines=6, elem_id=f"play-{role}")
                   for role, label in zip(ROLES, ("base", "tuned (adapters, weighted)",
                                                  "proxy-tuned (alpha)"), strict=True)}  # fmt: skip

    def on_refresh(chosen: list[str] | None) -> Any:
        found = list(workspace.adapters())
        return gr.update(choices=found, value=[name for name in chosen or [] if name in found])

    gr.on([*shown, refresh.click], on_refresh, adapters, adapters)

    def on_adapters(chosen: list[str] | None) -> list[Any]:
        chosen = chosen or []
        sliders = [gr.update(visible=i < len(chosen), label=f"weight of {chosen[i]}"
                             if i < len(chosen) else f"weight {i + 1}")
                   for i in range(MAX_ADAPTERS)]  # fmt: skip
        return [_recorded_base(workspace, chosen), *sliders]

    adapters.change(on_adapters, adapters, [model, *weights])
    inputs = [model, adapters, prompt, max_new_tokens, alpha, *weights]

    def run(which: tuple[str, ...]) -> Any:
        def handler(name: str, chosen: list[str] | None, text: str, count: float,
                    strength: float, *values: float) -> list[Any]:  # fmt: skip
            chosen = chosen or []
            if len(chosen) > MAX_ADAPTERS:
                from peftkit.errors import ConfigError

                raise ConfigError(f"Choose at most {MAX_ADAPTERS} adapters.")
            texts = playground.generate(name, chosen, text, list(values), strength, count, which)
            loaded = playground.loaded
            notes = "; ".join(loaded.notes) if loaded is not None else ""
            return [notes or "greedy decoding", *(texts.get(role, gr.update()) for role in ROLES)]

        return guarded(handler, 1 + len(ROLES))

    targets = [status, *outputs.values()]
    generate_button.click(run(ROLES), inputs, targets)
    prompt.submit(run(ROLES), inputs, targets)
    alpha.release(run(("proxy",)), inputs, targets)
    for weight in weights:  # a new mix changes the tuned model, and so the proxy-tuned text
        weight.release(run(("tuned", "proxy")), inputs, targets)
