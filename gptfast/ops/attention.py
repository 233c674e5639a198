"""`gptfast.attention`: fused scaled-dot-product attention with a causal mask.

Layers, thinnest on top:
  attention()                      public function: checks, autocast, backend choice
  _Attention (autograd.Function)   saves what backward needs, calls the backend's ops
  gptfast::<backend>_attention_fwd/_bwd
                                   the ops (schemas and fakes in `_library.py`), so
                                   torch.compile(fullgraph=True) traces through the kernels and
                                   torch.library.opcheck tests them, also on CPU under the
                                   Triton interpreter
  kernels/attention.py             the Triton kernels (csrc/ for CUDA C++)
The "torch" backend is `reference.attention_torch`: PyTorch's fused SDPA CPU kernel wherever
the options allow, else the reference (`reference.attention`), plain differentiable PyTorch.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import backends, reference
from ._checks import (FLOAT_DTYPES, autocast_on, check_range, check_same_device,
                      check_same_dtype, check_tensor, follow_autocast)
from ._library import kernel

OP = "attention"


# ---- kernel backends: what each supports ----------------------------------------------------

class Facts(NamedTuple):
    """What backend support depends on: hashable, so decisions are cached per distinct facts."""
    dtype: torch.dtype
    head_dim: int
    needs_grad: bool
    span_bits: int  # bit length of the largest (batch, head) slice span, in elements
    softcap: bool = False  # scores capped (softcap=c): not every backend has it


def facts(q: Tensor, k: Tensor, v: Tensor, needs_grad: bool, softcap: bool = False) -> Facts:
    # The span of a (batch, head) slice is its last element's offset + 1 (the kernels index
    # inside a slice with 32-bit offsets: kernels/attention.py `head_span`); the widest counts.
    d = q.shape[3]
    span = max((q.shape[2] - 1) * q.stride(2), (k.shape[2] - 1) * k.stride(2),
               (v.shape[2] - 1) * v.stride(2)) + d
    return Facts(q.dtype, d, needs_grad, span.bit_length(), softcap)


def _triton_support(f: Facts) -> Optional[str]:
    from gptfast.kernels import attention as kern
    if f.dtype not in kern.DTYPES:
        return f"dtype {f.dtype} is not supported (supported: {kern.DTYPES})"
    if not kern.head_dim_supported(f.head_dim):
        return (f"head dim {f.head_dim} is not supported (supported: every multiple of 8 from "
                f"8 to 256)")
    if f.span_bits > 31:
        return "a (batch, head) slice spans 2**31 elements or more (32-bit offsets inside it)"
    return None


def head_dim_supported(d: int) -> bool:
    """Whether the fused kernels take head dim `d` (forward and backward): every multiple of 8
    from 8 to 256. Pure arithmetic, no Triton import (what `gptfast info` and `explain` use to
    say which path a model preset takes on a GPU)."""
    return 8 <= d <= 256 and d % 8 == 0


backends.register_support(OP, "triton", _triton_support)

# Head dims of the CUDA C++ kernels (csrc/attention/configs.h: HeadDims; a test keeps the two
# lists equal). Forward and backward alike.
CUDA_HEAD_DIMS = (64, 96, 128)


def _cuda_support(f: Facts) -> Optional[str]:
    """The CUDA C++ kernels (csrc/attention/): FlashAttention-2 on mma.sync tiles."""
    problem = backends.mma_sync_dtype_problem(f.dtype)
    if problem is not None:
        return problem
    if f.head_dim not in CUDA_HEAD_DIMS:
        return f"head dim {f.head_dim} is not supported (supported: {CUDA_HEAD_DIMS})"
    if f.softcap:
        return "softcap is not supported by these kernels (backend='triton' or 'torch' has it)"
    return None


# Whether "auto" may pick the CUDA kernels where they can run the inputs. Off until a GPU run of
# benchmarks/bench_attention.py (rows gptfast-cuda against gptfast-triton, `make gpu-check`)
# shows them faster: they have only run on the CPU execution layer so far. backend="cuda" runs
# them whatever this says.
CUDA_AUTO = False


def _cuda_auto_policy(f: Facts) -> Optional[str]:
    if CUDA_AUTO:
        return None
    return ("'auto' prefers the Triton kernels until the CUDA ones are measured faster on a GPU "
            "(gptfast.ops.attention.CUDA_AUTO)")


backends.register_support(OP, "cuda", _cuda_support)
backends.register_auto_policy(OP, "cuda", _cuda_auto_policy)


# ---- autograd around the ops --------------------------------------------------------------------

class _Attention(torch.autograd.Function):
    """out, lse = gptfast::<backend>_attention_fwd(...), differentiable in q, k, v (and through
    lse). The ops themselves have no autograd: this Function is the only place it lives."""

    @staticmethod
    def forward(ctx, q, k, v, alibi_slopes, key_padding_mask, seed, causal, softmax_scale,
                window, dropout_p, deterministic, backend, softcap):
        out, lse = kernel(backend, "attention_fwd", q, k, v)(
            q, k, v, alibi_slopes, key_padding_mask, seed, causal, softmax_scale, window,
            dropout_p, softcap)
        ctx.set_materialize_grads(False)  # an unused output (often lse) gets None, not zeros
        ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, key_padding_mask, seed)
        ctx.args = (causal, softmax_scale, window, dropout_p, deterministic, backend, softcap)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if dout is None and dlse is None:  # neither output was used
            return (None,) * 13
        q, k, v, out, lse, alibi_slopes, key_padding_mask, seed = ctx.saved_tensors
        causal, softmax_scale, window, dropout_p, deterministic, backend, softcap = ctx.args
        if dout is None:  # only lse was used
            dout = torch.zeros_like(out)
        dq, dk, dv = kernel(backend, "attention_bwd", dout, q)(
            dout, dlse, q, k, v, out, lse, alibi_slopes, key_padding_mask, seed, causal,
            softmax_scale, window, dropout_p, deterministic, softcap)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


# ---- public function ----------------------------------------------------------------------------

def _check(q, k, v, causal, softmax_scale, alibi_slopes, window, key_padding_mask, dropout_p,
           softcap):
    """Every argument check, on metadata only; returns the device. Each `if` tests the common
    case in one expression and only on failure calls the helpers that name the culprit."""
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
            and q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and q.dtype in FLOAT_DTYPES
            and k.dtype in FLOAT_DTYPES and v.dtype in FLOAT_DTYPES):
        check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES, what="(B, Hq, Sq, d)")
        check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES, what="(B, Hkv, Sk, d)")
        check_tensor("v", v, ndim=4, dtypes=FLOAT_DTYPES, what="(B, Hkv, Sk, d)")
    device = q.device
    if not (k.device == device and v.device == device
            and (alibi_slopes is None or alibi_slopes.device == device)
            and (key_padding_mask is None or key_padding_mask.device == device)):
        check_same_device(q=q, k=k, v=v, alibi_slopes=alibi_slopes,
                          key_padding_mask=key_padding_mask)
    B, Hq, Sq, d = q.shape
    kshape = k.shape
    if kshape != v.shape:
        raise ValueError(f"k and v: expected the same shape (B, Hkv, Sk, d), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    _, Hkv, Sk, dk = kshape
    if kshape[0] != B or dk != d:
        raise ValueError(f"k: expected shape ({B}, Hkv, Sk, {d}) to match q {tuple(q.shape)}, "
                         f"got {tuple(kshape)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"k: the number of key/value heads ({Hkv}) must divide the number of "
                         f"query heads ({Hq}) (grouped-query attention)")
    if Sq == 0 or Sk == 0 or d == 0:
        raise ValueError(f"q, k: expected non-empty sequences and head dim, got Sq={Sq}, "
                         f"Sk={Sk}, d={d}")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float))
                                          and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale: expected a finite float or None, got {softmax_scale!r}")
    if alibi_slopes is not None:
        check_tensor("alibi_slopes", alibi_slopes, ndim=1, dtypes=FLOAT_DTYPES, what="(Hq,)")
        if alibi_slopes.shape[0] != Hq:
            raise ValueError(f"alibi_slopes: expected shape ({Hq},) (one slope per query head), "
                             f"got {tuple(alibi_slopes.shape)}")
    if window is not None:
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"window: expected a positive int or None, got {window!r}")
        if not causal:
            raise ValueError("window: local attention is defined for causal=True only "
                             "(query i sees keys i+Sk-Sq-window < j <= i+Sk-Sq)")
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,),
                     what="(B, Sk)")
        if tuple(key_padding_mask.shape) != (B, Sk):
            raise ValueError(f"key_padding_mask: expected shape ({B}, {Sk}), got "
                             f"{tuple(key_padding_mask.shape)}")
    if not (isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0):
        check_range("dropout_p", float(dropout_p), 0.0, 1.0, hi_open=True)
    if softcap is not None and not (isinstance(softcap, (int, float))
                                    and not isinstance(softcap, bool)
                                    and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap: expected a positive finite float or None, got {softcap!r}")
    return device


def _plan(q, k, v, *, causal=True, softmax_scale=None, alibi_slopes=None, window=None,
          key_padding_mask=None, dropout_p=0.0, deterministic=False, return_lse=False,
          backend="auto", softcap=None):
    device = _check(q, k, v, causal, softmax_scale, alibi_slopes, window, key_padding_mask,
                    dropout_p, softcap)
    if autocast_on():
        q, k, v = follow_autocast(device, q, k, v)
    dtype = q.dtype
    if k.dtype != dtype or v.dtype != dtype:
        check_same_dtype(q=q, k=k, v=v)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                              or v.requires_grad)
    return (backends.choose(OP, backend, device, facts(q, k, v, needs_grad, softcap is not None)),
            (q, k, v), needs_grad)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
              softmax_scale: Optional[float] = None, alibi_slopes: Optional[Tensor] = None,
              window: Optional[int] = None, key_padding_mask: Optional[Tensor] = None,
              dropout_p: float = 0.0, deterministic: bool = False, return_lse: bool = False,
              softcap: Optional[float] = None, backend: str = "auto"):
    """Scaled dot-product attention, fused (FlashAttention-style) where a kernel can run it.

    Arguments:
        q: (B, Hq, Sq, d).  k, v: (B, Hkv, Sk, d), the layout of
            `F.scaled_dot_product_attention`. Hkv must divide Hq (grouped-query / multi-query
            attention: query head h reads key/value head h // (Hq // Hkv)). fp16, bf16, fp32
            (fp64 on the "torch" backend). Only the last dim needs to be contiguous: q, k, v may
            be transposed slices of one fused QKV projection. d: the kernels take every
            multiple of 8 up to 256 (padded inside the tiles). Precision: the kernels' dots take
            fp16/bf16 operands and accumulate in fp32, softmax statistics are fp32; fp32 inputs
            get true fp32 dots (IEEE, not TF32: exact but several times slower than bf16).
        causal: mask future keys. When Sq != Sk the mask is aligned to the bottom-right corner,
            so the last query sees every key; that is what a KV cache needs. Query i sees key j
            iff j <= i + Sk - Sq. Sq = 2, Sk = 5 (1 = visible):
                1 1 1 1 0
                1 1 1 1 1
            Sq = 5, Sk = 2: the first three queries see no key and return zeros:
                0 0
                0 0
                0 0
                1 0
                1 1
        softmax_scale: multiplies q @ k^T; default 1 / sqrt(d).
        softcap: c > 0 caps the scores smoothly to (-c, c): score = c * tanh(softmax_scale *
            q.k / c), before ALiBi and the masks (Gemma-2's attn_logit_softcapping,
            FlashAttention's softcap). Differentiable; None (default) leaves scores linear.
        alibi_slopes: (Hq,) fp32; adds -slope_h * |i + Sk - Sq - j| to each scaled score (BLOOM).
        window: W; query i sees only keys i + Sk - Sq - W < j <= i + Sk - Sq (local
            attention; needs causal=True).
        key_padding_mask: (B, Sk) bool, True where a key is real (left or right padding).
        dropout_p: attention-probability dropout, applied whenever > 0 (pass 0.0 in eval).
        deterministic: backward without atomics, bitwise reproducible (kernel backends).
        return_lse: also return the log-sum-exp (B, Hq, Sq) fp32 of the scores over the
            visible keys (natural log; -inf for a row that sees no key).
        backend: "auto" | "cuda" | "triton" | "torch"; see `gptfast.explain`.

    Returns out (B, Hq, Sq, d) in the input dtype (the autocast dtype inside autocast), or
    (out, lse). A query row that sees no key returns zeros, never NaN, and zero gradients.
    """
    decision, (q, k, v), needs_grad = _plan(
        q, k, v, causal=causal, softmax_scale=softmax_scale, alibi_slopes=alibi_slopes,
        window=window, key_padding_mask=key_padding_mask, dropout_p=dropout_p,
        deterministic=deterministic, return_lse=return_lse, backend=backend, softcap=softcap)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    cap = float(softcap) if softcap is not None else None
    if decision.backend == "torch":
        out, lse = reference.attention_torch(q, k, v, causal=causal, softmax_scale=scale,
                                             alibi_slopes=alibi_slopes, window=window,
                                             key_padding_mask=key_padding_mask,
                                             dropout_p=dropout_p, return_lse=return_lse,
                                             softcap=cap)
        return (out, lse) if return_lse else out
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        # The kernels stream rows of d contiguous elements; anything else is rare enough
        # to pay for a copy.
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    seed = None
    if dropout_p > 0.0:
        # Drawn from torch's generator on the device (no host sync): torch.manual_seed
        # makes dropout reproducible, and backward regenerates the mask from it.
        seed = torch.randint(0, 2**31 - 1, (1,), device=q.device, dtype=torch.int64)
    slopes = alibi_slopes
    if slopes is not None and (slopes.dtype != torch.float32 or not slopes.is_contiguous()):
        slopes = slopes.float().contiguous()
    mask = key_padding_mask
    if mask is not None and not mask.is_contiguous():
        mask = mask.contiguous()
    if needs_grad:
        out, lse = _Attention.apply(q, k, v, slopes, mask, seed, causal, scale, window,
                                    float(dropout_p), bool(deterministic), decision.backend, cap)
    else:  # inference (or nothing requires grad): no autograd node at all
        out, lse = kernel(decision.backend, "attention_fwd", q, k, v)(
            q, k, v, slopes, mask, seed, causal, scale, window, float(dropout_p), cap)
    return (out, lse) if return_lse else out


def _explain(q, k, v, **kw) -> backends.Decision:
    """The decision for `gptfast.explain`, with what the "torch" backend would run (a copy:
    decisions are cached and shared by calls)."""
    decision, (q, k, v), _ = _plan(q, k, v, **kw)
    return dataclasses.replace(decision, torch_path=reference.attention_torch_path(
        q, alibi_slopes=kw.get("alibi_slopes"), dropout_p=kw.get("dropout_p", 0.0),
        return_lse=kw.get("return_lse", False), softcap=kw.get("softcap")))


backends.register_planner(OP, _explain)
