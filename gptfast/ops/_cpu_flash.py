"""PyTorch's own CPU flash-attention kernel, never gptfast's SDPA override of it.

While gptfast is the active SDPA provider (gptfast/sdpa.py) under TRITON_INTERPRET=1,
`aten::_scaled_dot_product_flash_attention_for_cpu` runs gptfast's kernels. Code that wants
PyTorch's CPU kernel itself (the "torch" backend's CPU path) calls `cpu_flash_attention`, which
uses the kernels captured at activation. It lives here, below the provider, so the ops layer
can import it without importing gptfast.sdpa.
"""
from __future__ import annotations

import torch

_CPU_KEYSET = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)

# (forward, backward) kernels PyTorch had before gptfast's override, while it is registered.
ORIGINAL = None


class _OriginalCpuFlash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, dropout_p, is_causal, attn_mask, scale, fwd, bwd):
        out, lse = fwd.call_boxed(_CPU_KEYSET, query, key, value, dropout_p, is_causal,
                                  attn_mask=attn_mask, scale=scale)
        ctx.save_for_backward(query, key, value, out, lse, attn_mask)
        ctx.args = (dropout_p, is_causal, scale, bwd)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        query, key, value, out, lse, attn_mask = ctx.saved_tensors
        dropout_p, is_causal, scale, bwd = ctx.args
        dq, dk, dv = bwd.call_boxed(_CPU_KEYSET, grad_out.contiguous(), query, key, value, out,
                                    lse, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
        return dq, dk, dv, None, None, None, None, None, None


def cpu_flash_attention(query, key, value, dropout_p: float = 0.0, is_causal: bool = False, *,
                        attn_mask=None, scale=None):
    """(out (B, H, Sq, d), lse (B, H, Sq)) from `aten::_scaled_dot_product_flash_attention_for_cpu`
    as PyTorch implements it, differentiable in query/key/value, never gptfast's override:
    safe to call from the "torch" backend while gptfast is the active SDPA provider. (Inside
    torch.compile the aten op itself is traced; an active provider then handles it at run time.)
    """
    original = ORIGINAL
    if original is None or torch.compiler.is_compiling():
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
    return _OriginalCpuFlash.apply(query, key, value, dropout_p, is_causal, attn_mask, scale,
                                   *original)
