"""Virtual-token methods: prompt tuning (Lester et al., 2021: soft prompt vectors before the input
embeddings, prompt.py) and prefix tuning (Li and Liang, 2021: per-layer key/value prefixes,
prefix.py with its layout in prefix_layout.py), built on transformers' public Cache interface in
PEFT's file format. shared.py holds what both need: the wrapper that gates their hooks (and
switches them off), the attention-mask and position bookkeeping, and generation with a cache."""

from peftkit.methods.virtual_tokens.prefix import PREFIX_TUNING
from peftkit.methods.virtual_tokens.prompt import PROMPT_TUNING

__all__ = ["PREFIX_TUNING", "PROMPT_TUNING"]
