"""4-bit blocks with a float minimum (GGUF's Q4_1 layout) for the int4 kernel twin.

A Q4_1 block is 32 weights w = d * q + m, q in 0..15, with d and m fp16. onnxruntime's MatMulNBits holds
4-bit blocks with an integer zero point, which cannot hold m, so a Q4_1 source requantized for it loses
perplexity (SmolLM2-135M: 45.7 against the GGUF's own 43.4, benchmarks/peers.json). edgellm's kernel
(edgellm/kernels/q4_kernel.h) reads d, m and the nibbles as they are.

The source weights reach convert as fp32 (dequantized by the GGUF reader: d * q + m in fp32), so each block's
d, m and q are recovered from them and the recovery is checked bit for bit. A block that is not on such a
grid (an fp16/fp32 source) is quantized the way llama.cpp's Q4_1 does it: m its minimum, d its range / 15,
q rounded to nearest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ModelFormatError

BLOCK = 32
ULPS = (0, 1, -1, 2, -2)  # fp16 steps tried around (max - min) / 15 when recovering d


@dataclass(frozen=True)
class Q4Blocks:
    """One weight matrix [N, K] as the kernel reads it."""

    nibbles: np.ndarray  # uint8 [N, K/32, 16]: byte i holds q[i] (low nibble) and q[i+16] (high), as GGUF stores them
    dm: np.ndarray       # float16 [N, K/32, 2]: d and m per block
    exact: float         # fraction of blocks that reproduce the source weights bit for bit

    @property
    def shape(self) -> tuple[int, int]:
        return self.nibbles.shape[0], self.nibbles.shape[1] * BLOCK


def _fp16(values: np.ndarray, what: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        half = values.astype(np.float16)
    if not np.isfinite(half).all():
        bad = values[~np.isfinite(half)].flat[0]
        raise ModelFormatError(f"a 4-bit block's {what} {float(bad)!r} does not fit float16 (largest 65504). Fix: "
                               "convert with --precision int8, or --no-kernel-graph.")
    return half


def from_weights(weights: np.ndarray) -> Q4Blocks:
    """weights: fp32 [N, K] (K a multiple of 32), one output row per row."""
    n, k = weights.shape
    if k % BLOCK:
        raise ModelFormatError(f"a matrix of width K={k} cannot be cut into 4-bit blocks of {BLOCK}. Fix: "
                               "convert with --no-kernel-graph.")
    w = np.ascontiguousarray(weights, dtype=np.float32).reshape(n, k // BLOCK, BLOCK)
    low, high = w.min(-1), w.max(-1)
    m16 = _fp16(low, "minimum")
    m = m16.astype(np.float32)[..., None]
    first = _fp16((high - low) / 15, "step")
    best_d = np.zeros_like(first)
    best_q = np.zeros(w.shape, np.uint8)
    found = np.zeros(low.shape, bool)
    for ulp in ULPS:  # exact recovery: d within a few fp16 steps of the range / 15, m the minimum itself
        d16 = (first.view(np.uint16).astype(np.int32) + ulp).clip(0, 0x7BFF).astype(np.uint16).view(np.float16)
        d = d16.astype(np.float32)[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.clip(np.rint((w - m) / d), 0, 15)
        q = np.where(np.isfinite(q), q, 0).astype(np.float32)
        ok = ((d * q + m) == w).all(-1) & (m16.astype(np.float32) == low) & ~found
        best_d[ok], best_q[ok] = d16[ok], q[ok].astype(np.uint8)
        found |= ok
    rest = ~found  # round to nearest, as llama.cpp quantizes Q4_1
    if rest.any():
        d = first.astype(np.float32)[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.clip(np.rint((w - m) / d), 0, 15)
        q = np.where(np.isfinite(q), q, 0).astype(np.uint8)
        best_d[rest], best_q[rest] = first[rest], q[rest]
    nibbles = (best_q[..., :16] | (best_q[..., 16:] << 4)).astype(np.uint8)
    dm = np.stack([best_d, m16], axis=-1)
    return Q4Blocks(nibbles, dm, float(found.mean()) if found.size else 1.0)


def dequantize(blocks: Q4Blocks) -> np.ndarray:
    """fp32 [N, K], d * q + m in fp32 as GGUF's reader computes it."""
    q = np.concatenate([blocks.nibbles & 0x0F, blocks.nibbles >> 4], axis=-1).astype(np.float32)
    d = blocks.dm[..., 0].astype(np.float32)[..., None]
    m = blocks.dm[..., 1].astype(np.float32)[..., None]
    n, nb, _ = q.shape
    return (d * q + m).reshape(n, nb * BLOCK)
