"""gptfast as PyTorch's SDPA flash implementation: any model's `F.scaled_dot_product_attention`
that reaches the flash path runs gptfast's kernels, with no change to the model.

    import gptfast
    gptfast.use_for_sdpa()          # = torch.nn.attention.activate_flash_attention_impl("gptfast")
    ...                             # every SDPA call that picks flash now runs gptfast's kernels
    torch.nn.attention.restore_flash_attention_impl()   # back to PyTorch's own

`import gptfast` registers the provider with PyTorch's registry
(`torch.nn.attention.register_flash_attention_impl`) and never activates it. Activation
overrides, for CUDA tensors, the aten ops SDPA's flash path calls:

    aten::_scaled_dot_product_flash_attention (+ _backward)   what F.scaled_dot_product_attention
                                                               calls, (B, H, S, d) layout
    aten::_flash_attention_forward (+ _backward)               the FlashAttention-2 entry, (B, S, H, d)

and, when TRITON_INTERPRET=1 (how CI proves all this on a CPU), the CPU flash ops
`aten::_scaled_dot_product_flash_attention_for_cpu` (+ _backward).

Each override runs gptfast's attention ops (CUDA C++ where built, else Triton) when they can
run the inputs with the op's own semantics, and otherwise calls the kernel PyTorch had before
activation (captured then with `torch.library.get_kernel`; calling the aten op again would
re-enter the override). Never an error. Falls through: a debug mask, varlen / paged / split-KV
inputs and ALiBi on the FA2 op, an `attn_mask` (CPU op), dropout on the CPU op (it has no RNG state to hand to its
backward), causal with Sq != Sk on the SDPA ops (SDPA aligns that top-left, gptfast bottom-right),
dtypes, head dims and layouts the kernels do not take. Forward and backward decide from the same
facts, so a backward always pairs with the forward that produced its lse.

Outputs match each op's meta registration (what torch.compile trusts): out and the gradients
in the memory order of query/key/value (`empty_like`, or the CPU ops' (B, S, H, d) order), lse
(B, H, Sq) fp32 (the CPU op's as a (B, Sq, H) buffer seen transposed), rng_state (2,) uint64 and
offset () uint64 as this PyTorch's meta kernel declares them (gptfast's dropout seed travels
in rng_state's first 8 bytes).
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Optional

import torch

from .ops import _cpu_flash
from .ops import attention as _attention_module  # noqa: F401 - registers the ops' support
from .ops import backends
from .ops._cpu_flash import cpu_flash_attention  # noqa: F401 - re-exported
from .ops._library import kernel
from .ops.attention import facts as _facts

NAME = "gptfast"

_CUDA_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
             "_flash_attention_forward", "_flash_attention_backward")
_CPU_OPS = ("_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_flash_attention_for_cpu_backward")
_ACTIVE: Optional["Provider"] = None  # set while the overrides are registered


# ---- the decision: can gptfast run these inputs, and on which backend --------------------------

def _backend_for(q, k, v) -> Optional[str]:
    """The gptfast kernel backend for these (B, H, S, d) views, or None to fall through.

    Decided with needs_grad=True whatever the grad mode, so that forward and backward (which
    sees the same tensors) always decide alike."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[0] != k.shape[0] \
            or q.shape[3] != k.shape[3] or k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0 \
            or q.dtype != k.dtype or q.dtype != v.dtype or q.numel() == 0 or k.numel() == 0:
        return None
    device = q.device
    if device.type == "cpu" and not backends.interpreter_enabled():
        return None
    # "auto" picks CUDA C++ then Triton on a GPU; on the CPU only the interpreter runs Triton.
    requested = "triton" if device.type == "cpu" else "auto"
    try:
        backend = backends.choose("attention", requested, device,
                                  _facts(q, k, v, needs_grad=True)).backend
    except backends.BackendError:
        return None
    return None if backend == "torch" else backend


def _last_dim_contiguous(*ts):
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in ts)


def _into(like: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The kernel's contiguous `t` in the memory order `torch.empty_like(like)` gives (what the
    meta registrations declare), copying only when that order is not the contiguous one."""
    if like.is_contiguous():
        return t
    res = torch.empty_like(like)
    res.copy_(t)
    return res


def _permuted_bshd(t: torch.Tensor) -> torch.Tensor:
    """A (B, H, S, d) tensor in (B, S, H, d) memory order (the CPU flash backward's gradients)."""
    res = torch.empty_permuted(t.shape, (0, 2, 1, 3), dtype=t.dtype, device=t.device)
    res.copy_(t)
    return res


_RNG_SPEC = None


def _rng_spec():
    """((shape, dtype) of rng_state, (shape, dtype) of offset) as this PyTorch's meta
    registration of the flash op declares them ((2,) and () uint64 on current CUDA builds,
    () int64 on older ones and ROCm), read once from the meta kernel."""
    global _RNG_SPEC
    if _RNG_SPEC is None:
        t = torch.empty(1, 1, 1, 8, device="meta", dtype=torch.float16)
        res = torch.ops.aten._scaled_dot_product_flash_attention.default(t, t, t)
        _RNG_SPEC = ((tuple(res[6].shape), res[6].dtype), (tuple(res[7].shape), res[7].dtype))
    return _RNG_SPEC


def _new_seed(device) -> torch.Tensor:
    """rng_state for a forward with dropout: gptfast's seed in its first 8 bytes, drawn from
    torch's generator on the device (no host sync), like gptfast.attention's."""
    (shape, dtype), _ = _rng_spec()
    words = max(1, math.prod(shape) * dtype.itemsize // 8)
    seed = torch.randint(0, 2**31 - 1, (words,), device=device, dtype=torch.int64)
    return seed.view(dtype).view(shape)


def _seed_of(rng_state: torch.Tensor) -> torch.Tensor:
    """gptfast's (1,) int64 seed tensor from an rng_state made by `_new_seed`."""
    return rng_state.reshape(-1).view(torch.int64)[:1]


def _rng_outputs(device, rng_state: Optional[torch.Tensor]):
    """(rng_state, offset) as the meta registrations declare them (zeros without dropout)."""
    (shape, dtype), (oshape, odtype) = _rng_spec()
    if rng_state is None:
        rng_state = torch.zeros(shape, dtype=torch.int64 if dtype == torch.uint64 else dtype,
                                device=device).view(dtype)
    offset = torch.zeros(oshape, dtype=torch.int64 if odtype == torch.uint64 else odtype,
                         device=device).view(odtype)
    return rng_state, offset


# ---- the adapters -------------------------------------------------------------------------------

class Provider:
    """The registered overrides and the kernels they fall through to.

    `original` maps an aten op name to the kernel PyTorch had for its dispatch key before
    activation (anything with `call_boxed(keyset, *args, **kwargs)`); tests build a Provider
    with stand-ins to exercise the adapters on CPU tensors."""

    def __init__(self, original: Dict[str, object], library=None):
        self.original = original
        self.library = library
        self.fallthroughs = 0  # calls handed to the original kernels (tests read it)

    def remove(self) -> None:
        global _ACTIVE
        if self.library is not None:
            self.library._destroy()
            self.library = None
        if _ACTIVE is self:
            _ACTIVE = None
            _cpu_flash.ORIGINAL = None

    def _fallthrough(self, name, keyset, args, kwargs):
        self.fallthroughs += 1
        return self.original[name].call_boxed(keyset, *args, **kwargs)

    # -- aten::_scaled_dot_product_flash_attention: (B, H, S, d), SDPA's semantics -------------

    def sdpa_flash_forward(self, keyset, query, key, value, dropout_p=0.0, is_causal=False,
                           return_debug_mask=False, *, scale=None):
        Sq, Sk = query.shape[2], key.shape[2]
        backend = None
        if not return_debug_mask and not (is_causal and Sq != Sk):
            backend = _backend_for(query, key, value)
        if backend is None:
            return self._fallthrough("_scaled_dot_product_flash_attention", keyset,
                                     (query, key, value, dropout_p, is_causal, return_debug_mask),
                                     dict(scale=scale))
        q, k, v = _last_dim_contiguous(query, key, value)
        sm_scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
        rng = _new_seed(q.device) if dropout_p > 0.0 else None
        out, lse = kernel(backend, "attention_fwd", q, k, v)(
            q, k, v, None, None, None if rng is None else _seed_of(rng), bool(is_causal),
            float(sm_scale), None, float(dropout_p))
        rng_state, offset = _rng_outputs(q.device, rng)
        debug_mask = torch.empty(0, dtype=query.dtype, device=query.device)
        return (_into(query, out), lse, None, None, Sq, Sk, rng_state, offset, debug_mask)

    def sdpa_flash_backward(self, keyset, grad_out, query, key, value, out, logsumexp, cum_seq_q,
                            cum_seq_k, max_q, max_k, dropout_p, is_causal, philox_seed,
                            philox_offset, *, scale=None):
        Sq, Sk = query.shape[2], key.shape[2]
        backend = None
        if cum_seq_q is None and not (is_causal and Sq != Sk):
            backend = _backend_for(query, key, value)
        if backend is None:
            return self._fallthrough(
                "_scaled_dot_product_flash_attention_backward", keyset,
                (grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
                 dropout_p, is_causal, philox_seed, philox_offset), dict(scale=scale))
        sm_scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
        seed = _seed_of(philox_seed) if dropout_p > 0.0 else None
        dq, dk, dv = self._backward(backend, grad_out, query, key, value, out, logsumexp,
                                    is_causal, sm_scale, None, None, dropout_p, seed)
        return _into(query, dq), _into(key, dk), _into(value, dv)

    def _backward(self, backend, grad_out, query, key, value, out, lse, causal, sm_scale,
                  window, alibi, dropout_p, seed):
        q, k, v, o = _last_dim_contiguous(query, key, value, out)
        return kernel(backend, "attention_bwd", grad_out, q)(
            grad_out, None, q, k, v, o, lse, alibi, None, seed, bool(causal), float(sm_scale),
            window, float(dropout_p), torch.are_deterministic_algorithms_enabled())

    # -- aten::_flash_attention_forward: (B, S, H, d), FlashAttention-2's semantics ------------
    # Causal is aligned bottom-right there, as in gptfast. Windows follow FA2: window_size_left
    # L >= 0 with causal is gptfast's window L + 1; -1 / None is unbounded.

    @staticmethod
    def _fa2_options(is_causal, kwargs):
        """(causal, window, alibi_slopes) in gptfast's terms, or None when not expressible."""
        for name in ("seqused_k", "block_table", "out"):
            if kwargs.get(name) is not None:
                return None
        if (kwargs.get("num_splits") or 1) > 1:
            return None
        left, right = kwargs.get("window_size_left"), kwargs.get("window_size_right")
        left = None if left is None or left < 0 else int(left)
        right = None if right is None or right < 0 else int(right)
        causal = bool(is_causal) or right == 0
        if right not in (None, 0) or (left is not None and not causal):
            return None
        if kwargs.get("alibi_slopes") is not None:
            # the FA2 backward op takes no slopes: whatever PyTorch's kernels do with them, the
            # pair of overrides could not do the same
            return None
        return causal, (left + 1 if left is not None else None), None

    def flash_forward(self, keyset, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k,
                      dropout_p, is_causal, return_debug_mask, **kwargs):
        opts = None
        backend = None
        if cum_seq_q is None and cum_seq_k is None and not return_debug_mask \
                and query.dim() == 4:
            opts = self._fa2_options(is_causal, kwargs)
            if opts is not None:
                backend = _backend_for(query.transpose(1, 2), key.transpose(1, 2),
                                       value.transpose(1, 2))
        if backend is None:
            return self._fallthrough("_flash_attention_forward", keyset,
                                     (query, key, value, cum_seq_q, cum_seq_k, max_q, max_k,
                                      dropout_p, is_causal, return_debug_mask), kwargs)
        causal, window, alibi = opts
        q, k, v = _last_dim_contiguous(query.transpose(1, 2), key.transpose(1, 2),
                                       value.transpose(1, 2))  # (B, H, S, d) views
        scale = kwargs.get("scale")
        sm_scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
        rng = _new_seed(q.device) if dropout_p > 0.0 else None
        out, lse = kernel(backend, "attention_fwd", q, k, v)(
            q, k, v, alibi, None, None if rng is None else _seed_of(rng), causal,
            float(sm_scale), window, float(dropout_p))
        rng_state, offset = _rng_outputs(q.device, rng)
        res = torch.empty_like(query)
        res.transpose(1, 2).copy_(out)
        debug_mask = torch.empty(0, dtype=query.dtype, device=query.device)
        return res, lse, rng_state, offset, debug_mask

    def flash_backward(self, keyset, grad_out, query, key, value, out, logsumexp, cum_seq_q,
                       cum_seq_k, max_q, max_k, dropout_p, is_causal, philox_seed, philox_offset,
                       **kwargs):
        opts = None
        backend = None
        if cum_seq_q is None and cum_seq_k is None and query.dim() == 4:
            opts = self._fa2_options(is_causal, kwargs)
            if opts is not None:
                backend = _backend_for(query.transpose(1, 2), key.transpose(1, 2),
                                       value.transpose(1, 2))
        if backend is None:
            return self._fallthrough("_flash_attention_backward", keyset,
                                     (grad_out, query, key, value, out, logsumexp, cum_seq_q,
                                      cum_seq_k, max_q, max_k, dropout_p, is_causal, philox_seed,
                                      philox_offset), kwargs)
        causal, window, _ = opts
        scale = kwargs.get("scale")
        sm_scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
        seed = _seed_of(philox_seed) if dropout_p > 0.0 else None
        grads = self._backward(backend, grad_out.transpose(1, 2), query.transpose(1, 2),
                               key.transpose(1, 2), value.transpose(1, 2), out.transpose(1, 2),
                               logsumexp, causal, sm_scale, window, None, dropout_p, seed)
        res = []
        for like, g in zip((query, key, value), grads):
            r = torch.empty_like(like)
            r.transpose(1, 2).copy_(g)
            res.append(r)
        return tuple(res)

    # -- aten::_scaled_dot_product_flash_attention_for_cpu (TRITON_INTERPRET=1 only) -----------

    def cpu_flash_forward(self, keyset, query, key, value, dropout_p=0.0, is_causal=False, *,
                          attn_mask=None, scale=None):
        backend = None
        if attn_mask is None and dropout_p == 0.0 \
                and not (is_causal and query.shape[2] != key.shape[2]):
            backend = _backend_for(query, key, value)
        if backend is None:
            return self._fallthrough("_scaled_dot_product_flash_attention_for_cpu", keyset,
                                     (query, key, value, dropout_p, is_causal),
                                     dict(attn_mask=attn_mask, scale=scale))
        q, k, v = _last_dim_contiguous(query, key, value)
        sm_scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
        out, lse = kernel(backend, "attention_fwd", q, k, v)(
            q, k, v, None, None, None, bool(is_causal), float(sm_scale), None, 0.0)
        B, H, Sq = lse.shape
        lse_bsh = torch.empty((B, Sq, H), dtype=lse.dtype, device=lse.device).transpose(1, 2)
        lse_bsh.copy_(lse)
        return _into(query, out), lse_bsh

    def cpu_flash_backward(self, keyset, grad_out, query, key, value, out, logsumexp, dropout_p,
                           is_causal, *, attn_mask=None, scale=None):
        backend = None
        if attn_mask is None and dropout_p == 0.0 \
                and not (is_causal and query.shape[2] != key.shape[2]):
            backend = _backend_for(query, key, value)
        if backend is None:
            return self._fallthrough("_scaled_dot_product_flash_attention_for_cpu_backward",
                                     keyset, (grad_out, query, key, value, out, logsumexp,
                                              dropout_p, is_causal),
                                     dict(attn_mask=attn_mask, scale=scale))
        sm_scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
        dq, dk, dv = self._backward(backend, grad_out, query, key, value, out, logsumexp,
                                    is_causal, sm_scale, None, None, 0.0, None)
        return _permuted_bshd(dq), _permuted_bshd(dk), _permuted_bshd(dv)


_ADAPTERS = {
    "_scaled_dot_product_flash_attention": "sdpa_flash_forward",
    "_scaled_dot_product_flash_attention_backward": "sdpa_flash_backward",
    "_flash_attention_forward": "flash_forward",
    "_flash_attention_backward": "flash_backward",
    "_scaled_dot_product_flash_attention_for_cpu": "cpu_flash_forward",
    "_scaled_dot_product_flash_attention_for_cpu_backward": "cpu_flash_backward",
}


# ---- activation -------------------------------------------------------------------------------

def _overridden_ops():
    """(aten op name, dispatch key) pairs activation overrides here."""
    ops = [(name, "CUDA") for name in _CUDA_OPS]
    if backends.interpreter_enabled():  # CI's proof on the CPU: the Triton interpreter
        ops += [(name, "CPU") for name in _CPU_OPS]
    return [(n, key) for n, key in ops if hasattr(torch.ops.aten, n)]


def activate() -> Provider:
    """Register the overrides (the `register_fn` PyTorch's registry calls). Prefer
    `gptfast.use_for_sdpa()` or `torch.nn.attention.activate_flash_attention_impl("gptfast")`."""
    global _ACTIVE
    if _ACTIVE is not None:  # activating twice would capture our own override as "original"
        _ACTIVE.remove()
    if not hasattr(torch.library, "get_kernel"):
        raise RuntimeError(
            f"gptfast's SDPA provider needs torch.library.get_kernel (PyTorch >= 2.9) to fall "
            f"through to PyTorch's own kernels; this is torch {torch.__version__}")
    ops = _overridden_ops()
    original = {name: torch.library.get_kernel(f"aten::{name}", key) for name, key in ops}
    provider = Provider(original)
    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():  # "Overriding a previously registered kernel": intended
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel")
        for name, key in ops:
            lib.impl(name, getattr(provider, _ADAPTERS[name]), key, with_keyset=True)
    provider.library = lib
    _ACTIVE = provider
    if _CPU_OPS[0] in original:  # PyTorch's CPU kernels stay reachable for the "torch" backend
        _cpu_flash.ORIGINAL = (original[_CPU_OPS[0]], original[_CPU_OPS[1]])
    return provider


def active() -> bool:
    """Whether gptfast's overrides are registered now."""
    return _ACTIVE is not None


def use_for_sdpa() -> None:
    """Make every `F.scaled_dot_product_attention` call that reaches the flash path run
    gptfast's kernels (falling through to PyTorch's own where they cannot). Undo with
    `torch.nn.attention.restore_flash_attention_impl()` (or `gptfast.sdpa.restore()`)."""
    registry = _registry()
    if registry is not None:
        registry.activate_flash_attention_impl(NAME)
    else:
        activate()


def restore() -> None:
    """Undo `use_for_sdpa()`: PyTorch's own kernels again (also on PyTorch versions whose
    registry has no `restore_flash_attention_impl`)."""
    registry = _registry()
    if registry is not None and hasattr(registry, "restore_flash_attention_impl") \
            and registry.current_flash_attention_impl() == NAME:
        registry.restore_flash_attention_impl()
    if _ACTIVE is not None:
        _ACTIVE.remove()


def _registry():
    attn = getattr(torch.nn, "attention", None)
    if attn is None or not hasattr(attn, "register_flash_attention_impl"):
        return None
    return attn


def register() -> bool:
    """Make "gptfast" known to PyTorch's registry (called on `import gptfast`; activates
    nothing). False when this PyTorch has no registry (then `use_for_sdpa()` still works)."""
    registry = _registry()
    if registry is None:
        return False
    registry.register_flash_attention_impl(NAME, register_fn=activate)
    return True


__all__ = ["use_for_sdpa", "restore", "active", "cpu_flash_attention", "register", "activate",
           "Provider", "NAME"]
