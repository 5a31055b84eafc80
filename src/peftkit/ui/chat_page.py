"""The Chat page: talk to an adapter and its base side by side, several turns, each answer
streamed as it is decoded, with temperature, top-p and max tokens; on the serve engine
(chat.py), so what the page answers is what `peftkit serve` would."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from peftkit.errors import PeftkitError
from peftkit.ui.chat import SIDES, ChatEngines, chat_stream
from peftkit.ui.playground_page import _recorded_base
from peftkit.ui.widgets import error_text
from peftkit.ui.workspace import Workspace

LABELS = {"base": "base", "tuned": "with the adapter"}


def build(workspace: Workspace, shown: list[Any]) -> ChatEngines:
    """The page's widgets and events (inside a gr.Tab); `shown` are the events on which the
    workspace's adapters are read again. Returns the engines (stopped when the UI ends)."""
    from peftkit.models import bundled_names

    engines = ChatEngines(workspace)
    with gr.Row():
        model = gr.Dropdown(bundled_names(), value="smollm2-135m", allow_custom_value=True,
                            label="base model", elem_id="chat-model",
                            info="follows the model the adapter was trained on")  # fmt: skip
        adapter = gr.Dropdown([], label="adapter", elem_id="chat-adapter",
                              info="a finished run of a method the server batches")  # fmt: skip
    with gr.Row():
        temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature",
                                info="0: greedy", elem_id="chat-temperature")  # fmt: skip
        top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p",
                          elem_id="chat-top-p")  # fmt: skip
        max_tokens = gr.Number(64, precision=0, minimum=1, label="max tokens",
                               elem_id="chat-max-tokens")  # fmt: skip
    with gr.Row(equal_height=True):
        windows = {side: gr.Chatbot(label=LABELS[side], elem_id=f"chat-{side}", height=320)
                   for side in SIDES}  # fmt: skip
    message = gr.Textbox(label="message", elem_id="chat-message", max_lines=4,
                         placeholder="Enter sends it to both")  # fmt: skip
    with gr.Row():
        send = gr.Button("Send", variant="primary", elem_id="chat-send")
        clear = gr.Button("Clear", elem_id="chat-clear")
    status = gr.Markdown(elem_id="chat-status")
    conversations = gr.State(None)  # {side: [turns]}: each side's own conversation

    def on_refresh(chosen: str | None) -> Any:
        found = list(workspace.adapters())
        return gr.update(choices=found, value=chosen if chosen in found else None)

    gr.on(shown, on_refresh, adapter, adapter)
    adapter.change(lambda chosen: _recorded_base(workspace, [chosen] if chosen else []),
                   adapter, model)  # fmt: skip

    def on_send(
        name: str, chosen: str | None, text: str, heat: float, nucleus: float, count: float,
        held: dict[str, list[dict[str, str]]] | None,
    ) -> Iterator[list[Any]]:  # fmt: skip
        held = held or {side: [] for side in SIDES}
        if not (text or "").strip():
            yield [*(gr.update() for _ in SIDES), gr.update(), held, "Write a message first."]
            return
        asked = {side: [*held[side], {"role": "user", "content": text}] for side in SIDES}
        try:
            service = engines.service_for(name, chosen)
            answers = {side: "" for side in SIDES}
            for answers in chat_stream(service, asked, heat, nucleus, count or 1):
                shown_now = {side: [*asked[side], {"role": "assistant", "content": answers[side]}]
                             for side in SIDES}  # fmt: skip
                yield [*shown_now.values(), "", held, "answering..."]
        except PeftkitError as error:
            yield [*(held[side] for side in SIDES), gr.update(), held, error_text(error)]
            return
        done = {side: [*asked[side], {"role": "assistant", "content": answers[side]}]
                for side in SIDES}  # fmt: skip
        yield [*done.values(), "", done, "done"]

    inputs = [model, adapter, message, temperature, top_p, max_tokens, conversations]
    outputs = [*windows.values(), message, conversations, status]
    send.click(on_send, inputs, outputs)
    message.submit(on_send, inputs, outputs)

    def on_clear() -> list[Any]:
        return [[] for _ in SIDES] + [None, ""]

    clear.click(on_clear, None, [*windows.values(), conversations, status])
    # Another base or adapter starts a new conversation.
    gr.on([model.change, adapter.change], on_clear, None,
          [*windows.values(), conversations, status])  # fmt: skip
    return engines
