"""LoftQ (Li et al., 2023, arXiv:2310.08659): initialise LoRA so that the quantised base plus the
adapter starts close to the full-precision weights.

For each adapted matrix W, alternate T times: Q_t = quantise(W - s B A), then s B A = the best
rank-r approximation of W - Q_t (truncated SVD). The base keeps Q_T, the adapter starts at B, A.

peftkit runs this itself: PEFT 0.21's `loftq_init` needs bitsandbytes and a CUDA device, and it
fits B A to W - Q without the LoRA scale s = alpha / r (huggingface/peft#1982), so its start is
off by that factor whenever alpha != r. The quantiser is 4-bit NormalFloat as bitsandbytes
computes it (QLoRA, Dettmers et al., 2023): blocks of 64 consecutive values of the flattened
weight, each scaled by its absolute maximum and rounded to the nearest of 16 levels. Until
peftkit loads quantised bases, the base stores Q's values in its own dtype: the numbers are the
ones a 4-bit base would hold, the memory is not yet saved."""

from __future__ import annotations

import torch

# The 16 NF4 levels (QLoRA, Appendix E; bitsandbytes' `get_4bit_type("nf4")`): normalised quantiles
# of N(0, 1), 8 positive, 7 negative and an exact zero. tests/test_lora_loftq.py derives them again.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
NF4_BLOCK_SIZE = 64  # bitsandbytes' default for Params4bit and BitsAndBytesConfig


def nf4_round_trip(weight: torch.Tensor, block_size: int = NF4_BLOCK_SIZE) -> torch.Tensor:
    """The weight quantised to NF4 and dequantised again (blockwise absmax, as bitsandbytes)."""
    flat = weight.detach().reshape(-1).to(torch.float32)
    padding = (-flat.numel()) % block_size
    blocks = torch.nn.functional.pad(flat, (0, padding)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    # An all-zero block stays zero (its scale is never used).
    scaled = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
    index = torch.bucketize(scaled, (levels[1:] + levels[:-1]) / 2)  # nearest level
    restored = (levels[index] * absmax).view(-1)[: flat.numel()]
    return restored.view_as(weight).to(weight.dtype)


def loftq_factors(
    weight: torch.Tensor, rank: int, scale: float, iterations: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q, A, B) for a weight in (out, in) layout: Q its quantised base, scale * B @ A the rank-r
    fit of weight - Q after `iterations` alternations."""
    target = weight.detach().to(torch.float32)
    fit = torch.zeros_like(target)
    for _ in range(iterations):
        quantised = nf4_round_trip(target - fit).to(torch.float32)
        u, s, vh = torch.linalg.svd(target - quantised, full_matrices=False)
        root = (s[:rank] / scale).sqrt()  # split s B A evenly between the factors, as PiSSA does
        b, a = u[:, :rank] * root, root[:, None] * vh[:rank]
        fit = scale * b @ a
    return quantised, a, b


def quantisation_error(weight: torch.Tensor, approximation: torch.Tensor) -> float:
    """Frobenius norm of weight - approximation (both taken in float32)."""
    return float(torch.linalg.matrix_norm(weight.float() - approximation.float()))
