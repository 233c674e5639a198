"""Naive attention oracle for the kernel tests (explicit (Sq, Sk) mask, full softmax).

Run in float64 it is the oracle; run in the input dtype it is "PyTorch's own same-dtype eager
attention", whose error against the oracle sets the tolerance (FlashAttention's rule).
Masks are bottom-right aligned (offset = Sk - Sq). A row with no visible key gives out = 0,
lse = -inf and zero gradients (never NaN), matching the kernel contract.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def visibility(B: int, Hq: int, Sq: int, Sk: int, *, causal: bool, window: Optional[int],
               key_padding_mask: Optional[Tensor], device) -> Tensor:
    """(B, Hq, Sq, Sk) bool, True where query i may see key j."""
    i = torch.arange(Sq, device=device)[:, None]
    j = torch.arange(Sk, device=device)[None, :]
    diag = i + (Sk - Sq)
    vis = torch.ones(Sq, Sk, dtype=torch.bool, device=device)
    if causal:
        vis = vis & (j <= diag)
    if window is not None:
        vis = vis & (j > diag - window)
    vis = vis[None, None].expand(B, Hq, Sq, Sk)
    if key_padding_mask is not None:
        vis = vis & key_padding_mask[:, None, None, :].to(device)
    return vis


def padding_mask(B: int, Sk: int, kind: str, device) -> Tensor:
    """(B, Sk) bool, True = real key. kinds: right padding, left padding, one batch row empty."""
    m = torch.ones(B, Sk, dtype=torch.bool, device=device)
    lengths = [Sk - 1 - (b * 37) % max(Sk - 1, 1) for b in range(B)]
    for b, n in enumerate(lengths):
        if kind == "right":
            m[b, n:] = False
        elif kind == "left":
            m[b, : Sk - n] = False
        elif kind == "empty":
            if b == 0:
                m[b] = False
            else:
                m[b, n:] = False
    return m


def attention_ref(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, softmax_scale: float,
                  alibi_slopes: Optional[Tensor] = None, window: Optional[int] = None,
                  key_padding_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                  keep: Optional[Tensor] = None, dtype: torch.dtype = torch.float64,
                  softcap: Optional[float] = None):
    """Returns (out, lse) computed in `dtype` (differentiable w.r.t. q, k, v).

    Dropout uses the given (B, Hq, Sq, Sk) bool keep-mask on the normalized probabilities;
    softcap c: scores c * tanh(scale * q.k / c) before ALiBi and the masks."""
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    rep = Hq // Hkv
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    s = (q @ k.transpose(-1, -2)) * softmax_scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        i = torch.arange(Sq, device=q.device)[:, None]
        j = torch.arange(Sk, device=q.device)[None, :]
        dist = (i + (Sk - Sq) - j).abs().to(dtype)
        s = s - alibi_slopes.to(q.device, dtype)[None, :, None, None] * dist
    vis = visibility(B, Hq, Sq, Sk, causal=causal, window=window,
                     key_padding_mask=key_padding_mask, device=q.device)
    alive = vis.any(-1, keepdim=True)
    # Dead rows get finite scores (0) so neither softmax nor its gradient produce NaN; their
    # probabilities are then selected away.
    s = torch.where(vis, s, float("-inf"))
    s = torch.where(alive, s, torch.zeros((), dtype=dtype, device=q.device))
    p = torch.softmax(s, dim=-1)
    p = torch.where(alive, p, torch.zeros((), dtype=dtype, device=q.device))
    lse = torch.logsumexp(s, dim=-1)
    lse = torch.where(alive.squeeze(-1), lse, torch.full((), float("-inf"), dtype=dtype, device=q.device))
    if dropout_p > 0.0:
        assert keep is not None
        p = torch.where(keep.to(q.device), p / (1.0 - dropout_p), torch.zeros((), dtype=dtype, device=q.device))
    return p @ v, lse


def attention_grads(out: Tensor, lse: Tensor, leaves, do: Tensor, dlse: Optional[Tensor],
                    dtype: torch.dtype):
    """Gradients of (out, lse) with respect to `leaves` for upstream gradients do and, when
    given, dlse, both cast to `dtype` (the reference's float64 or the eager run's dtype)."""
    outs, gouts = [out], [do.to(dtype)]
    if dlse is not None:
        outs.append(lse)
        gouts.append(dlse.to(dtype))
    return torch.autograd.grad(outs, leaves, gouts)


def attention_references(q: Tensor, k: Tensor, v: Tensor, *, keep: Optional[Tensor],
                         dtype: torch.dtype, **opts):
    """The float64 reference and the same math in `dtype` (PyTorch's own precision, the
    tolerance rule's yardstick), each on fresh leaves that take gradients:
    (leaves64, leaves_eager, (out64, lse64), (out_eager, lse_eager))."""
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    leaves_eager = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    return (leaves64, leaves_eager,
            attention_ref(*leaves64, **opts, keep=keep, dtype=torch.float64),
            attention_ref(*leaves_eager, **opts, keep=keep, dtype=dtype))
