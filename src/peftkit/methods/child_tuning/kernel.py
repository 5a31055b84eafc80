"""Child-Tuning F's masked AdamW step for CPU float32 weights as one compiled loop (numba).

Per entry, in one pass: hash the entry's index with the tensor's seeds into 16 random bits, keep
the entry if they fall below p's threshold, scale the kept gradient by 1/p, update both Adam
moments (a masked gradient counts as zero, so its moments decay), and move the weight only if
kept. Each entry's gradient, moments and weight are read once and its moments and weight written
once, as in torch's fused AdamW kernel; the chunked torch version of the same step
(child_tuning_adamw) makes about a dozen passes over each chunk and took 4x as long.

The random bits are child_tuning_masks' one stream (lowbias32 of the index mixed with the
tensor's two seeds for this step); its keep_mask draws the same bits with torch ops."""

from __future__ import annotations

import math

import numpy as np
import torch

try:  # numba is a dependency; without it (or off CPU) the chunked torch step runs instead
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

_BLOCK = 1 << 16  # entries per parallel work item
# No fast-math flags: the branch-free loop vectorises without them (29 vs 27 ms per 32M entries),
# and each entry gets exactly the IEEE operations written below. With fused multiply-adds allowed,
# the distributed test's two-process and one-process F runs differed by up to 1.2e-5 after twelve
# steps (its bound is 1e-5), against 2.4e-6 without; why FMA widened that gap is not established.


def available(parameter: torch.Tensor) -> bool:
    """Whether the compiled step can update this tensor (CPU, float32, under 2^32 entries)."""
    return (
        numba is not None
        and parameter.device.type == "cpu"
        and parameter.dtype == torch.float32
        and parameter.numel() < 2**32
    )


if numba is not None:

    @numba.njit(inline="always", cache=True)
    def _lowbias32(x):  # noqa: ANN001, ANN202 - numba infers the types
        """A 32-bit integer hash with good avalanche (C. Wellons' lowbias32)."""
        x = np.uint32(x ^ (x >> np.uint32(16)))
        x = np.uint32(x * np.uint32(0x7FEB352D))
        x = np.uint32(x ^ (x >> np.uint32(15)))
        x = np.uint32(x * np.uint32(0x846CA68B))
        return np.uint32(x ^ (x >> np.uint32(16)))

    @numba.njit(error_model="numpy", cache=True)
    def _block(p, g, m, v, keep, base, seed_hi, seed_lo, threshold, scale, decay, one_minus_beta1,
               beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt):  # fmt: skip  # noqa: ANN001, ANN202
        """One contiguous block: no branches in the loop, so it vectorises. (1 - beta) comes in
        computed in float64: in float32, 1 - 0.999 is off by 1.3e-5 of itself."""
        for i in range(p.size):
            index = np.uint32(base + i)
            bits = _lowbias32(np.uint32((index ^ seed_hi) + seed_lo)) >> np.uint32(16)
            kept = np.float32(bits < threshold)
            grad = g[i] * scale * kept
            exp_avg = m[i] + one_minus_beta1 * (grad - m[i])  # torch's lerp for weight < 0.5
            exp_avg_sq = v[i] * beta2 + one_minus_beta2 * grad * grad
            m[i] = exp_avg
            v[i] = exp_avg_sq
            weight = p[i]
            denom = math.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
            new = weight * decay - step_size * exp_avg / denom
            p[i] = weight + kept * (new - weight)  # x + 0 * d = x: unkept entries stay exactly
            keep[i] = np.uint8(kept)

    @numba.njit(parallel=True, error_model="numpy", cache=True)
    def _step(p, g, m, v, keep, seed_hi, seed_lo, threshold, scale, decay, one_minus_beta1, beta2,
              one_minus_beta2, eps, step_size, bias_correction2_sqrt):  # fmt: skip  # noqa: ANN001, ANN202
        """All blocks of one tensor, in parallel over numba's threads."""
        n = p.size
        for block in numba.prange((n + _BLOCK - 1) // _BLOCK):
            start = block * _BLOCK
            stop = min(start + _BLOCK, n)
            _block(p[start:stop], g[start:stop], m[start:stop], v[start:stop], keep[start:stop],
                   start, seed_hi, seed_lo, threshold, scale, decay, one_minus_beta1, beta2,
                   one_minus_beta2, eps, step_size, bias_correction2_sqrt)  # fmt: skip

    @numba.njit(parallel=True, error_model="numpy", cache=True)
    def _track(keep, touched):  # noqa: ANN001, ANN202
        """touched |= keep; returns how many entries were touched for the first time."""
        added = 0
        n = keep.size
        for block in numba.prange((n + _BLOCK - 1) // _BLOCK):
            count = 0
            for i in range(block * _BLOCK, min(block * _BLOCK + _BLOCK, n)):
                count += keep[i] & (1 - touched[i])
                touched[i] |= keep[i]
            added += count
        return added


def use_torchs_thread_count() -> None:
    """Run the compiled loops on torch's thread count (the same budget, no oversubscription).

    numba's first parallel call (or get_num_threads) launches its thread pool; with its OpenMP
    layer, which shares torch's OpenMP runtime, the launch sets the process's OpenMP thread count
    to numba's default (every core). That silently undid torch.set_num_threads(1) for the rest of
    the process: the first Child-Tuning F run in a process ran its later steps on all cores and
    every later run on one, so they rounded differently. The count torch had is put back."""
    threads = torch.get_num_threads()
    numba_threads = numba.get_num_threads()  # launches numba's pool on first use
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if numba_threads != threads and threads <= numba.config.NUMBA_NUM_THREADS:
        numba.set_num_threads(threads)


def track(keep: torch.Tensor, touched: torch.Tensor) -> int:
    """touched |= keep on flat bool CPU tensors, in one pass; the number of entries newly set."""
    return int(_track(keep.view(torch.uint8).numpy(), touched.view(torch.uint8).numpy()))


def masked_adamw_step(
    weight: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    keep: torch.Tensor,
    seeds: tuple[int, int],
    hyper: dict[str, float],
) -> None:
    """One masked AdamW step on flat contiguous float32 CPU tensors; keep (bool) gets the mask.

    seeds: this tensor's two 32-bit seeds for this step (child_tuning_masks.step_seeds). hyper:
    threshold (entries whose 16 random bits are below it are kept: p = threshold / 65536), scale
    (1/p), lr, weight_decay, beta1, beta2, eps and step (the count after this update)."""
    step = hyper["step"]
    f32 = np.float32
    use_torchs_thread_count()
    _step(
        weight.numpy(), grad.numpy(), exp_avg.numpy(), exp_avg_sq.numpy(),
        keep.view(torch.uint8).numpy(), np.uint32(seeds[0]), np.uint32(seeds[1]),
        np.uint32(hyper["threshold"]), f32(hyper["scale"]),
        f32(1 - hyper["lr"] * hyper["weight_decay"]),
        f32(1 - hyper["beta1"]), f32(hyper["beta2"]), f32(1 - hyper["beta2"]), f32(hyper["eps"]),
        f32(hyper["lr"] / (1 - hyper["beta1"] ** step)),
        f32(math.sqrt(1 - hyper["beta2"] ** step)),
    )  # fmt: skip
