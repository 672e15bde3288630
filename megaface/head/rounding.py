"""Stochastic rounding fp32 -> bf16 with counter-based randomness (the bf16 FC7 master weight's update).

A bf16 weight updated with round-to-nearest loses every update smaller than half its ulp (2^-9 of the weight):
with lr 0.1 and small gradients most updates of a converging row would vanish. Stochastic rounding rounds up
with probability (x - down) / (up - down), so the stored weight is unbiased: E[round(x)] = x.

The random bits are not drawn from a generator: they are a hash of (seed, step, global row, column).
    * runs are deterministic and a resume is bit-exact with no RNG state to save (the step is the counter);
    * a row's rounding is the same whichever rank holds it: results do not depend on the world size
      (the row index is the row's global index, not its index in the shard).

How: the fp32 bit pattern plus a uniform 16-bit integer r, truncated to its upper 16 bits. For |x| between two
bf16 neighbours, the carry into bit 16 happens exactly when r >= 2^16 - (low 16 bits of x), i.e. with
probability low / 2^16 = (|x| - down) / ulp; bf16 values (low bits 0) never carry, so they are kept exactly.
The sign bit is untouched (sign-magnitude), so negative values round symmetrically.
"""

from __future__ import annotations

from typing import TypeVar

import torch

_T = TypeVar("_T", torch.Tensor, int)
_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2^31: x (< 2^32) times one stays below 2^63, so int64 arithmetic never overflows.
_MUL1, _MUL2 = 0x7FEB352D, 0x5BD1E995
PIECE_ROWS = 1024  # rows rounded at a time: 4 MiB per int64 temporary at D=512


def hash32(x: _T) -> _T:
    """A 32-bit integer mixing function (xor-shift-multiply) on int64 tensors or Python ints in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _MASK32
    return x ^ (x >> 16)


def _salt(seed: int, step: int) -> int:
    return int(hash32(hash32(int(seed) & _MASK32) ^ (int(step) & _MASK32)))


def random_bits16(seed: int, step: int, rows: torch.Tensor, dim: int) -> torch.Tensor:
    """[n, dim] int32 values in [0, 2^16): a hash of (seed, step, rows[i] (global row), column j)."""
    row = rows.to(torch.int64)
    row_key = hash32(hash32((row & _MASK32) ^ _salt(seed, step)) ^ (row >> 32))  # [n]
    cols = torch.arange(dim, device=rows.device, dtype=torch.int64) * 0x9E3779B1 & _MASK32  # spread the columns
    return (hash32(row_key.unsqueeze(1) ^ cols) & 0xFFFF).to(torch.int32)


def stochastic_round_bf16(x: torch.Tensor, seed: int, step: int, rows: torch.Tensor) -> torch.Tensor:
    """x [n, D] fp32 -> bf16, rounded up or down at random with the probabilities that make it unbiased.

    rows [n]: the global row index of each row of x (its randomness; independent of the shard it lives in).
    Exact on bf16-representable values; non-finite values are kept (inf stays inf, nan stays nan).
    """
    if x.dtype != torch.float32 or x.dim() != 2 or rows.shape != x.shape[:1]:
        raise ValueError(f"stochastic_round_bf16 takes fp32 [n, D] and rows [n], got {x.dtype} "
                         f"{tuple(x.shape)} and {tuple(rows.shape)}")
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    for lo in range(0, x.shape[0], PIECE_ROWS):  # the int64 hash temporaries stay a few MB
        piece = x[lo:lo + PIECE_ROWS]
        bits = piece.view(torch.int32) + random_bits16(seed, step, rows[lo:lo + PIECE_ROWS], x.shape[1])
        upper = torch.bitwise_right_shift(bits, 16).to(torch.int16)  # arithmetic shift: bf16's 16 bits
        out[lo:lo + PIECE_ROWS] = torch.where(torch.isfinite(piece), upper.view(torch.bfloat16), piece.bfloat16())
    return out
