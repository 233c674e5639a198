"""`gptfast.attention`: fused scaled-dot-product attention with a causal mask.

Layers, thinnest on top:
  attention()                  public function: checks, autocast, backend choice
  gptfast::attention_fwd/_bwd  custom ops (register_fake + register_autograd), so that
                               torch.compile(fullgraph=True) traces through the kernels and
                               torch.library.opcheck can test them, also on CPU under the
                               Triton interpreter
  kernels/attention.py         the Triton kernels (csrc/ for CUDA C++)
The "torch" backend is the reference (`reference.attention`), plain differentiable PyTorch.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import backends, reference
from ._checks import (FLOAT_DTYPES, check_range, check_same_device, check_same_dtype,
                      check_tensor, follow_autocast)

OP = "attention"


# ---- kernel backends: what each supports, and how to call it --------------------------------

def _triton_support(inputs: dict) -> Optional[str]:
    from gptfast.kernels import attention as kern
    if inputs["dtype"] not in kern.DTYPES:
        return f"dtype {inputs['dtype']} is not supported (supported: {kern.DTYPES})"
    d = inputs["head_dim"]
    if d not in kern.HEAD_DIMS_FWD:
        return f"head dim {d} is not supported (supported: {kern.HEAD_DIMS_FWD})"
    if max(kern.head_span(t) for t in inputs["qkv"]) >= 2**31:
        return "a (batch, head) slice spans 2**31 elements or more (32-bit offsets inside it)"
    if inputs["needs_grad"] and d not in kern.HEAD_DIMS_BWD:
        return (f"head dim {d} has no backward kernel (backward supports {kern.HEAD_DIMS_BWD});"
                f" forward-only use (torch.no_grad) is supported")
    return None


def _kernel_module(backend: str):
    if backend == "triton":
        from gptfast.kernels import attention as kern
        return kern
    raise RuntimeError(f"attention: no {backend} kernels are registered")  # pragma: no cover


backends.register_support(OP, "triton", _triton_support)


# ---- the custom ops ---------------------------------------------------------------------------

def _opts(causal, softmax_scale, alibi_slopes, window, key_padding_mask, dropout_p, seed):
    return dict(causal=causal, softmax_scale=softmax_scale, alibi_slopes=alibi_slopes,
                window=window, key_padding_mask=key_padding_mask, dropout_p=dropout_p, seed=seed)


@torch.library.custom_op("gptfast::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, alibi_slopes: Optional[Tensor],
                   key_padding_mask: Optional[Tensor], seed: Optional[Tensor], causal: bool,
                   softmax_scale: float, window: Optional[int], dropout_p: float,
                   deterministic: bool, backend: str) -> tuple[Tensor, Tensor]:
    # `deterministic` only matters to the backward; it is an input so autograd can save it.
    out, lse = _kernel_module(backend).attention_forward(
        q, k, v, **_opts(causal, softmax_scale, alibi_slopes, window, key_padding_mask,
                         dropout_p, seed))
    return out.contiguous(), lse.contiguous()


@_attention_fwd.register_fake
def _(q, k, v, alibi_slopes, key_padding_mask, seed, causal, softmax_scale, window, dropout_p,
      deterministic, backend):
    B, H, S, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, S), dtype=torch.float32)


@torch.library.custom_op("gptfast::attention_bwd", mutates_args=())
def _attention_bwd(dout: Tensor, dlse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                   out: Tensor, lse: Tensor, alibi_slopes: Optional[Tensor],
                   key_padding_mask: Optional[Tensor], seed: Optional[Tensor], causal: bool,
                   softmax_scale: float, window: Optional[int], dropout_p: float,
                   deterministic: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _kernel_module(backend).attention_backward(
        dout, q, k, v, out, lse, dlse=dlse, deterministic=deterministic,
        **_opts(causal, softmax_scale, alibi_slopes, window, key_padding_mask, dropout_p, seed))
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_attention_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, alibi_slopes, key_padding_mask, seed, causal,
      softmax_scale, window, dropout_p, deterministic, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    (q, k, v, alibi_slopes, key_padding_mask, seed, causal, softmax_scale, window, dropout_p,
     deterministic, backend) = inputs
    out, lse = output
    ctx.set_materialize_grads(False)  # an unused output (often lse) gets None, not zeros
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, key_padding_mask, seed)
    ctx.args = (causal, softmax_scale, window, dropout_p, deterministic, backend)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi_slopes, key_padding_mask, seed = ctx.saved_tensors
    causal, softmax_scale, window, dropout_p, deterministic, backend = ctx.args
    if dout is None:  # only lse was used
        dout = torch.zeros_like(out)
    dq, dk, dv = _attention_bwd(dout, dlse, q, k, v, out, lse, alibi_slopes, key_padding_mask,
                                seed, causal, softmax_scale, window, dropout_p, deterministic,
                                backend)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- public function ----------------------------------------------------------------------------

def _check(q, k, v, causal, softmax_scale, alibi_slopes, window, key_padding_mask, dropout_p):
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES, what="(B, Hq, Sq, d)")
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES, what="(B, Hkv, Sk, d)")
    check_tensor("v", v, ndim=4, dtypes=FLOAT_DTYPES, what="(B, Hkv, Sk, d)")
    device = check_same_device(q=q, k=k, v=v, alibi_slopes=alibi_slopes,
                               key_padding_mask=key_padding_mask)
    B, Hq, Sq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v: expected the same shape (B, Hkv, Sk, d), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != d:
        raise ValueError(f"k: expected shape ({B}, Hkv, Sk, {d}) to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    Hkv, Sk = k.shape[1], k.shape[2]
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
    check_range("dropout_p", float(dropout_p), 0.0, 1.0, hi_open=True)
    return device


def _plan(q, k, v, *, causal=True, softmax_scale=None, alibi_slopes=None, window=None,
          key_padding_mask=None, dropout_p=0.0, deterministic=False, return_lse=False,
          backend="auto"):
    device = _check(q, k, v, causal, softmax_scale, alibi_slopes, window, key_padding_mask,
                    dropout_p)
    q, k, v = follow_autocast(device, q, k, v)
    check_same_dtype(q=q, k=k, v=v)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                              or v.requires_grad)
    inputs = dict(dtype=q.dtype, head_dim=q.shape[-1], needs_grad=needs_grad, qkv=(q, k, v),
                  deterministic=deterministic, dropout_p=dropout_p)
    decision = backends.choose(OP, backend, device, inputs)
    decision.torch_path = reference.attention_torch_path(q, alibi_slopes=alibi_slopes,
                                                         dropout_p=dropout_p,
                                                         return_lse=return_lse)
    return decision, (q, k, v)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
              softmax_scale: Optional[float] = None, alibi_slopes: Optional[Tensor] = None,
              window: Optional[int] = None, key_padding_mask: Optional[Tensor] = None,
              dropout_p: float = 0.0, deterministic: bool = False, return_lse: bool = False,
              backend: str = "auto"):
    """Scaled dot-product attention, fused (FlashAttention-style) where a kernel can run it.

    Arguments:
        q: (B, Hq, Sq, d).  k, v: (B, Hkv, Sk, d), the layout of
            `F.scaled_dot_product_attention`. Hkv must divide Hq (grouped-query / multi-query
            attention: query head h reads key/value head h // (Hq // Hkv)). fp16, bf16, fp32
            (fp64 on the "torch" backend). Only the last dim needs to be contiguous: q, k, v may
            be transposed slices of one fused QKV projection. Precision: the kernels' dots take
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
        alibi_slopes: (Hq,) fp32; adds -slope_h * |i + Sk - Sq - j| to each scaled score (BLOOM).
        window: W; query i sees only keys i + Sk - Sq - W < j <= i + Sk - Sq (local
            attention; needs causal=True).
        key_padding_mask: (B, Sk) bool, True where a key is real (left or right padding).
        dropout_p: attention-probability dropout, applied whenever > 0 (pass 0.0 in eval).
        deterministic: backward without atomics, bitwise reproducible (kernel backends).
        return_lse: also return the log-sum-exp (B, Hq, Sq) fp32 of the scaled scores over the
            visible keys (natural log; -inf for a row that sees no key).
        backend: "auto" | "cuda" | "triton" | "torch"; see `gptfast.explain`.

    Returns out (B, Hq, Sq, d) in the input dtype (the autocast dtype inside autocast), or
    (out, lse). A query row that sees no key returns zeros, never NaN, and zero gradients.
    """
    decision, (q, k, v) = _plan(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                alibi_slopes=alibi_slopes, window=window,
                                key_padding_mask=key_padding_mask, dropout_p=dropout_p,
                                deterministic=deterministic, return_lse=return_lse,
                                backend=backend)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if decision.backend == "torch":
        out, lse = reference.attention_torch(q, k, v, causal=causal, softmax_scale=scale,
                                             alibi_slopes=alibi_slopes, window=window,
                                             key_padding_mask=key_padding_mask,
                                             dropout_p=dropout_p, return_lse=return_lse)
    else:
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
            # The kernels stream rows of d contiguous elements; anything else is rare enough
            # to pay for a copy.
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        seed = None
        if dropout_p > 0.0:
            # Drawn from torch's generator on the device (no host sync): torch.manual_seed
            # makes dropout reproducible, and backward regenerates the mask from it.
            seed = torch.randint(0, 2**31 - 1, (1,), device=q.device, dtype=torch.int64)
        slopes = alibi_slopes.float().contiguous() if alibi_slopes is not None else None
        mask = key_padding_mask.contiguous() if key_padding_mask is not None else None
        out, lse = _attention_fwd(q, k, v, slopes, mask, seed, causal, scale, window,
                                  float(dropout_p), bool(deterministic), decision.backend)
    return (out, lse) if return_lse else out


backends.register_planner(OP, lambda *a, **kw: _plan(*a, **kw)[0])
