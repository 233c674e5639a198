"""Keyed dropout in Triton: one pass over x, no mask stored (backward regenerates it).

Only the kernel and its launcher live here; the autograd Function and the definition of the
keyed bits are in `gptfast/randomness.py`, which this kernel reproduces bit for bit:

    site key   s_b    = mix32(keys[b] ^ mix32(site * 0x9E3779B1))   (computed by the caller)
    bits       b[b,c] = mix32(mix32(c ^ 0x165667B1) ^ s_b)          c = flat position in row b
    keep              = bits >= threshold                            threshold = round(p * 2**32)
    out               = keep ? x * scale : 0

mix32 is MurmurHash3's 32-bit finalizer. Here it runs in uint32 arithmetic (a multiply wraps
mod 2**32, which is the definition); the torch version computes the same values in int64.
x is viewed as (B, n) rows of n contiguous elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._grid import checked_grid
from ._interpreter import ensure_bf16

BLOCK = 1024


@triton.jit
def _mix32(h):
    """MurmurHash3 fmix32 on uint32 values."""
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _keyed_dropout_kernel(X, OUT, SITE_KEYS, n, stride_xb, stride_ob, threshold, scale,
                          BLOCK: tl.constexpr):
    # One program per (column block, row), folded onto axis 0 (column block fastest).
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(n, BLOCK)
    row = (pid // n_blocks).to(tl.int64)
    cols = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < n
    site_key = tl.load(SITE_KEYS + row).to(tl.uint32)
    bits = _mix32(_mix32(cols.to(tl.uint32) ^ 0x165667B1) ^ site_key)
    keep = bits.to(tl.int64) >= threshold
    x = tl.load(X + row * stride_xb + cols, mask=in_row, other=0.0)
    y = tl.where(keep, x.to(tl.float32) * scale, 0.0)
    tl.store(OUT + row * stride_ob + cols, y.to(OUT.dtype.element_ty), mask=in_row)


def keyed_dropout_grid(rows: int, n: int) -> tuple:
    return checked_grid(rows * triton.cdiv(n, BLOCK))


def keyed_dropout(x: torch.Tensor, site_keys: torch.Tensor, threshold: int,
                  scale: float) -> torch.Tensor:
    """x (B, ...) with each row contiguous; site_keys (B,) int64 in [0, 2**32). Returns a new
    tensor: x * scale where the row's keyed bits are >= threshold, else 0."""
    rows = x.shape[0]
    x2 = x.reshape(rows, -1)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n = x2.shape[1]
    out = torch.empty_like(x2)
    if out.numel() == 0:
        return out.view(x.shape)
    ensure_bf16(x2)
    _keyed_dropout_kernel[keyed_dropout_grid(rows, n)](
        x2, out, site_keys.contiguous(), n, x2.stride(0), out.stride(0), int(threshold),
        float(scale), BLOCK=BLOCK)
    return out.view(x.shape)
