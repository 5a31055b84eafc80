"""Classify from the pooling a checkpoint was trained with, not always from the first token.

transformers' `BertForSequenceClassification` classifies `tanh(dense(h_CLS))`. Sentence-embedding
checkpoints such as all-MiniLM-L6-v2 (the bundled `minilm`) were trained on the *mean* of their
token states and say so in `1_Pooling/config.json`; their first token carries little (measured on
the Amazon reviews task: a logistic regression on frozen first-token features scores 0.633, on
mean-pooled features 0.698, majority class 0.623). A method that changes the encoder little (BitFit,
prompt tuning) cannot make up for that within a short run, so peftkit swaps the encoder's pooler
for a masked mean when the checkpoint declares one. The classifier on top is unchanged.

The mean needs the attention mask, which transformers does not pass to the pooler: a pre-hook on
the encoder keeps the mask of the current call. Virtual tokens are covered: prompt tuning lengthens
the mask with its tokens (they are averaged in, as they are part of the sequence), and prefix
tuning lengthens it with positions that have no hidden state (the mask's last columns are taken).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.io import write_json_atomically

POOLING_FILE = Path("1_Pooling") / "config.json"


class MeanPooler(nn.Module):
    """Mean of the token states under the attention mask (sentence-transformers' mean pooling)."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, length, hidden) -> (batch, hidden), padding left out."""
        batch, length = hidden_states.shape[:2]
        mask = self.mask
        if mask is None or mask.shape[0] != batch or mask.shape[1] < length:
            mask = hidden_states.new_ones(batch, length)
        weights = mask[:, -length:].to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def declared_pooling(folder: Path | str) -> str | None:
    """'mean' where a checkpoint folder's 1_Pooling/config.json asks for mean pooling."""
    path = Path(folder) / POOLING_FILE
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return "mean" if config.get("pooling_mode_mean_tokens") else None


def _keep_mask(pooler: MeanPooler) -> Any:
    """A pre-hook for the encoder that hands the call's attention mask to the pooler."""

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        pooler.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    return hook


def install_mean_pooling(model: nn.Module) -> bool:
    """Replace the encoder's first-token pooler with a masked mean; False if it has none."""
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if encoder is None or getattr(encoder, "pooler", None) is None:
        return False
    pooler = MeanPooler()
    encoder.pooler = pooler
    encoder.register_forward_pre_hook(_keep_mask(pooler), with_kwargs=True)
    return True


def uses_mean_pooling(model: nn.Module) -> bool:
    """True if install_mean_pooling changed this model (or the model it wraps)."""
    return any(isinstance(module, MeanPooler) for module in model.modules())


def write_pooling_config(folder: Path | str, hidden_size: int) -> Path:
    """Write 1_Pooling/config.json so that peftkit (and sentence-transformers) pool by the mean
    when they load a merged model from `folder`."""
    path = Path(folder) / POOLING_FILE
    config = {
        "word_embedding_dimension": hidden_size,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    return write_json_atomically(path, config)
