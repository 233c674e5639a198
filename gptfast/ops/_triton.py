"""The Triton implementations of the `gptfast::triton_*` ops (schemas in `_library.py`).

Registered for the CUDA key, and for the CPU key, which is what runs under the Triton
interpreter (TRITON_INTERPRET=1, how CI tests the kernels; backend choice never sends CPU
tensors here otherwise). The kernel modules are imported on the first launch, not when gptfast
is imported: importing Triton costs about a second.
"""
from __future__ import annotations

import torch

from . import reference
from ._library import NAMESPACE, PY_KERNELS, REDUCTION

_REDUCTION_NAME = {v: k for k, v in REDUCTION.items()}
_attention = None
_cross_entropy = None


def _attn():
    global _attention
    if _attention is None:
        from gptfast.kernels import attention
        _attention = attention
    return _attention


def _ce():
    global _cross_entropy
    if _cross_entropy is None:
        from gptfast.kernels import cross_entropy
        _cross_entropy = cross_entropy
    return _cross_entropy


# ---- attention --------------------------------------------------------------------------------

def attention_fwd(q, k, v, alibi_slopes, key_padding_mask, seed, causal, softmax_scale, window,
                  dropout_p, softcap=None):
    return _attn().attention_forward(
        q, k, v, causal=causal, softmax_scale=softmax_scale, alibi_slopes=alibi_slopes,
        window=window, key_padding_mask=key_padding_mask, dropout_p=dropout_p, seed=seed,
        softcap=softcap)


def attention_bwd(dout, dlse, q, k, v, out, lse, alibi_slopes, key_padding_mask, seed, causal,
                  softmax_scale, window, dropout_p, deterministic, softcap=None):
    return _attn().attention_backward(
        dout, q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale,
        alibi_slopes=alibi_slopes, window=window, key_padding_mask=key_padding_mask,
        dropout_p=dropout_p, seed=seed, dlse=dlse, deterministic=deterministic,
        softcap=softcap)


# ---- cross-entropy over logits ------------------------------------------------------------------

def cross_entropy_fwd(logits, targets, ignore_index, label_smoothing, z_loss, softcap):
    return _ce().cross_entropy_forward(logits, targets, ignore_index=ignore_index,
                                       label_smoothing=label_smoothing, z_loss=z_loss,
                                       softcap=softcap)


def cross_entropy_bwd(grad_rows, grad_lse, logits, targets, lse, ignore_index, label_smoothing,
                      z_loss, softcap):
    return _ce().cross_entropy_backward(grad_rows, grad_lse, logits, targets, lse,
                                        ignore_index=ignore_index,
                                        label_smoothing=label_smoothing, z_loss=z_loss,
                                        softcap=softcap)


def cross_entropy_bwd_(grad_rows, grad_lse, logits, targets, lse, ignore_index, label_smoothing,
                       z_loss, softcap):
    _ce().cross_entropy_backward(grad_rows, grad_lse, logits, targets, lse, inplace=True,
                                 ignore_index=ignore_index, label_smoothing=label_smoothing,
                                 z_loss=z_loss, softcap=softcap)


# ---- linear cross-entropy ------------------------------------------------------------------------

def _no_bias_grad(hidden, db):
    return db if db is not None else hidden.new_empty(0)  # ops cannot return None


def linear_cross_entropy_fwd(hidden, weight, targets, bias, ignore_index, label_smoothing,
                             z_loss, softcap):
    loss_rows, lse, _ = _ce().linear_cross_entropy_forward(
        hidden, weight, targets, bias, reduction="none", ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    return loss_rows, lse


def linear_cross_entropy_bwd(grad_rows, grad_lse, hidden, weight, targets, bias, lse,
                             ignore_index, label_smoothing, z_loss, softcap, filter_eps=None):
    dh, dw, db = _ce().linear_cross_entropy_backward(
        grad_rows, grad_lse, hidden, weight, targets, bias, lse, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, filter_eps=filter_eps)
    return dh, dw, _no_bias_grad(hidden, db)


def linear_cross_entropy_fwd_grad(hidden, weight, targets, bias, ignore_index, label_smoothing,
                                  z_loss, softcap, reduction, memory_budget):
    name = _REDUCTION_NAME[reduction]
    loss_rows, lse, grads = _ce().linear_cross_entropy_forward(
        hidden, weight, targets, bias, reduction=name, memory_budget=memory_budget,
        ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap)
    if grads is None:  # no rows: the launcher took the lean path, every gradient is zero
        grads = (torch.zeros_like(hidden), torch.zeros_like(weight),
                 torch.zeros_like(bias) if bias is not None else None)
    dh, dw, db = grads
    loss = reference.reduce_rows(loss_rows, targets, ignore_index, name)
    return loss, lse, dh, dw, _no_bias_grad(hidden, db)


# ---- registration ------------------------------------------------------------------------------

IMPLS = {
    "attention_fwd": attention_fwd,
    "attention_bwd": attention_bwd,
    "cross_entropy_fwd": cross_entropy_fwd,
    "cross_entropy_bwd": cross_entropy_bwd,
    "cross_entropy_bwd_": cross_entropy_bwd_,
    "linear_cross_entropy_fwd": linear_cross_entropy_fwd,
    "linear_cross_entropy_bwd": linear_cross_entropy_bwd,
    "linear_cross_entropy_fwd_grad": linear_cross_entropy_fwd_grad,
}

_LIB = torch.library.Library(NAMESPACE, "IMPL")  # held: dropping it deregisters the kernels
for _name, _fn in IMPLS.items():
    for _key in ("CUDA", "CPU"):
        _LIB.impl(f"triton_{_name}", _fn, _key)
    PY_KERNELS[("triton", _name)] = _fn  # see _library.kernel: eager calls may skip the dispatcher
