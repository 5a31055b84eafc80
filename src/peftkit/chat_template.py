"""Chat rendering: a conversation (or a user prompt) as the text a chat model reads, through the
tokenizer's chat template. Training (tasks/chat.py) and decoding (decoding/prompts.py) both render
through here, so a chat-tuned adapter reads its prompts as it trained.

Tokenizers without a chat template (peftkit's tiny byte-level test tokenizer, base models) get
FALLBACK_CHAT_TEMPLATE:

    <|system|>
    {system}
    <|user|>
    {user}
    <|assistant|>
    {assistant}{eos_token}
"""

from __future__ import annotations

from typing import Any

Message = dict[str, str]
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def chat_template(tokenizer: Any) -> str:
    """The tokenizer's own chat template, or FALLBACK_CHAT_TEMPLATE when it has none."""
    return getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE


def render_chat(
    messages: list[Message], tokenizer: Any, add_generation_prompt: bool = False
) -> str:
    """The conversation as text, through the chat template."""
    return tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template(tokenizer),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def render_prompt(tokenizer: Any, prompt: str | list[Message]) -> str:
    """A user message (or a message list ending with a user turn) as the text a chat model
    reads before answering: through the template, generation prompt added."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return render_chat(messages, tokenizer, add_generation_prompt=True)
