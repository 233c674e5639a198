"""Randomness keyed by sample: dropout masks and uniform draws that are a function of
(run seed, global sample index, site, position), never of how the samples are batched.

Why: a run split over N processes must make the same random choices as the same run on one
process, and a run resumed on another number of processes must continue the same run. A
stateful generator cannot give that (its draws depend on how many elements were drawn before
on this process); a counter-based hash can. The training loop gives every row of a batch its
key (`sample_keys`: one int per global sample index), and every random choice about that row
hashes (key, site, position):

    row key    k_g = H(seed, g)                   g = global sample index of the row
    site key   s_g = H(k_g, site)                 site: which dropout (embedding, block i, ...)
    bits       b[g, c] = H(s_g ^ H(c))            c = flat position inside the row, < 2**32
    keep       b >= round(p * 2**32)              P(keep) = 1 - p to within 2**-32

H is MurmurHash3's 32-bit finalizer, computed with int64 torch ops on values below 2**32 (the
multiplications are split in 16-bit halves, so no product overflows int64): the same bits on
every device and in every batch layout. Cost: ~25 elementwise int64 ops per element of a
dropout site (a fused Bernoulli draw is one) in the torch expression, so on eager CUDA tensors
`keyed_dropout` runs a Triton kernel instead (`gptfast/kernels/dropout.py`: one read and one
write of x, the mask regenerated in backward, never stored), bit for bit the same mask; under
torch.compile the torch expression fuses into one kernel. A zero dropout costs nothing.

Not keyed: the attention-probability dropout. Its mask comes from the fused kernel's Philox
counter (batch row, head, query, key) under one seed per call, and on the CPU from the
reference's `rand_like`; neither takes a per-row key, so it depends on the batch layout. The
training loop seeds torch's generator per micro-batch from (seed, first global sample index of
the process's rows) (`layout_seed`), so it is reproducible for a given number of processes,
resumes included, but not across numbers of processes.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["mix32", "sample_keys", "keyed_bits", "keyed_uniform", "keyed_dropout",
           "KeyedDropout", "derive_keys", "layout_seed", "SITE_SCHEDULED_SAMPLING"]

M32 = 0xFFFFFFFF
# Sites outside the model's dropout sites (the model numbers its own from 0).
SITE_SCHEDULED_SAMPLING = 0x5C4ED01E

IntOrTensor = Union[int, Tensor]


def _mul32(h: IntOrTensor, c: int) -> IntOrTensor:
    """(h * c) mod 2**32 for 0 <= h, c < 2**32 without leaving int64: h*c_lo < 2**48 and only
    the low 16 bits of h*c_hi matter."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & M32


def mix32(h: IntOrTensor) -> IntOrTensor:
    """MurmurHash3 fmix32 of values in [0, 2**32): a bijection that mixes every input bit into
    every output bit. Python ints and int64 tensors alike."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _seed32(seed: int) -> int:
    seed = int(seed)
    return mix32((seed & M32) ^ 0x9E3779B9) ^ mix32(((seed >> 32) & M32) ^ 0x7F4A7C15)


def sample_keys(seed: int, first: int, n: int, device: Union[str, torch.device] = "cpu") -> Tensor:
    """(n,) int64 keys in [0, 2**32) of global samples first, first+1, ..., first+n-1 of the
    run seeded with `seed`."""
    g = torch.arange(int(first), int(first) + int(n), dtype=torch.int64, device=device)
    k = mix32((g & M32) ^ _seed32(seed))
    return mix32(k ^ ((g >> 32) & M32) ^ 0x27D4EB2F)


def derive_keys(keys: Tensor, salt: int) -> Tensor:
    """Independent keys for another use of the same rows (e.g. a second forward pass)."""
    return mix32(keys ^ mix32(int(salt) & M32))


def keyed_uniform(keys: Tensor, site: int, shape) -> Tensor:
    """Uniform float32 in [0, 1) of shape (B, *shape), 24 bits each, keyed per row."""
    shape = tuple(shape)
    n = 1
    for s in shape:
        n *= int(s)
    bits = keyed_bits(keys, site, n)
    return ((bits >> 8).to(torch.float32) * 2.0**-24).view(keys.shape[0], *shape)


def _site_keys(keys: Tensor, site: int) -> Tensor:
    return mix32(keys ^ mix32((int(site) * 0x9E3779B1) & M32))


def keyed_bits(keys: Tensor, site: int, n: int) -> Tensor:
    """(B, n) int64 uniform 32-bit values: row b's values are a function of (keys[b], site,
    position) only."""
    if n > 2**32:
        raise ValueError(f"keyed randomness: {n} values per row exceed 2**32")
    pos = mix32(torch.arange(n, dtype=torch.int64, device=keys.device) ^ 0x165667B1)  # (n,)
    return mix32(pos[None, :] ^ _site_keys(keys, site)[:, None])                     # (B, n)


class _KeyedDropoutKernel(torch.autograd.Function):
    """The Triton kernel (`gptfast.kernels.dropout`): the mask is recomputed from the keys in
    backward, never stored; bit for bit the mask of the torch expression below."""

    @staticmethod
    def forward(ctx, x, site_keys, threshold, scale):
        from gptfast.kernels import dropout as kern
        ctx.save_for_backward(site_keys)
        ctx.args = (threshold, scale)
        return kern.keyed_dropout(x, site_keys, threshold, scale)

    @staticmethod
    def backward(ctx, grad):
        from gptfast.kernels import dropout as kern
        (site_keys,) = ctx.saved_tensors
        return kern.keyed_dropout(grad, site_keys, *ctx.args), None, None, None


def _use_kernel(x: Tensor) -> bool:
    """Eager CUDA tensors take the Triton kernel (one pass instead of ~25 int64 ops an
    element); under torch.compile the torch expression fuses into one kernel anyway."""
    from .ops import backends
    return (x.device.type == "cuda" and not torch.compiler.is_compiling()
            and backends.triton_unavailable(x.device) is None)


def keyed_dropout(x: Tensor, p: float, keys: Tensor, site: int, *,
                  use_kernel: Optional[bool] = None) -> Tensor:
    """Inverted dropout of x (B, ...) whose mask for row b depends only on (keys[b], site,
    position in the row): the same whichever batch, process or micro-step the row is in.
    use_kernel: None picks the Triton kernel for eager CUDA tensors; True/False force it (the
    tests run it under the Triton interpreter on CPU)."""
    if p == 0.0:
        return x
    if keys.dim() != 1 or keys.shape[0] != x.shape[0]:
        raise ValueError(f"keyed_dropout: keys must be ({x.shape[0]},) for x of shape "
                         f"{tuple(x.shape)}, got {tuple(keys.shape)}")
    threshold, scale = round(p * 2.0**32), 1.0 / (1.0 - p)
    if use_kernel if use_kernel is not None else _use_kernel(x):
        return _KeyedDropoutKernel.apply(x, _site_keys(keys, site), threshold, scale)
    keep = keyed_bits(keys, site, x[0].numel()).view(x.shape) >= threshold
    return torch.where(keep, x * scale, torch.zeros((), dtype=x.dtype, device=x.device))


class KeyedDropout(nn.Dropout):
    """nn.Dropout that takes the rows' keys: forward(x, keys=None). With keys (B,) the mask
    is `keyed_dropout`'s (layout-independent); without, it is nn.Dropout's own."""

    def __init__(self, p: float = 0.5, site: int = 0):
        super().__init__(p)
        self.site = int(site)

    def forward(self, x: Tensor, keys: Optional[Tensor] = None) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if keys is None:
            return F.dropout(x, self.p, True, self.inplace)
        return keyed_dropout(x, self.p, keys, self.site)

    def extra_repr(self) -> str:
        return f"p={self.p}, site={self.site}"


def layout_seed(seed: int, first: int) -> int:
    """A 63-bit seed for torch's generator from (run seed, first global sample index of this
    process's micro-batch): what stays layout-dependent (attention dropout) is then at least
    a function of the run and the position in it, not of the history of draws."""
    a = mix32(_seed32(seed) ^ (int(first) & M32))
    b = mix32(a ^ ((int(first) >> 32) & M32) ^ 0x61C88647)
    return ((a << 31) ^ b) & (2**63 - 1)
