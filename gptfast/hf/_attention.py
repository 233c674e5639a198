"""gptfast.attention inside Hugging Face models: the attention function, its mask, BLOOM's layer.

transformers (>= 5) dispatches attention through two registries keyed by
`config._attn_implementation`:
  AttentionInterface      (module, query, key, value, attention_mask, dropout=, scaling=,
                          sliding_window=, softcap=, **kwargs) -> (out (B, S, H, d), weights)
  AttentionMaskInterface  builds the `attention_mask` that reaches the function above, once per
                          forward. An implementation missing here gets attention_mask=None, so
                          padding would be silently ignored: gptfast registers both.

The mask gptfast builds is HF's 2-D padding mask cut to the keys the layer sees: a (B, Sk) bool
tensor, True = real key, or None when nothing is masked. Causality and the sliding window are
not in it: the kernel applies them itself (bottom-right aligned: the last query is the last key),
from `causal=True` and the layer's `sliding_window` argument, exactly as HF's flash-attention
path does. Patterns the kernel cannot express are refused when the mask is built: packed
sequences (position_ids restarting inside a row), bidirectional or block masks, custom
or/and mask functions.

BLOOM computes its scores with `baddbmm` instead of going through the interface, so its
attention module's forward is replaced (`bloom_attention_forward`), with ALiBi as slopes.
"""
from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import gptfast

NAME = "gptfast"  # the key in both transformers registries


def attention_takes_softcap() -> bool:
    """Whether gptfast.attention can soft-cap scores (Gemma-2's attn_logit_softcapping)."""
    return "softcap" in inspect.signature(gptfast.attention).parameters


def _backend(module) -> str:
    return getattr(module, "_gptfast_backend", "auto")


# ---- the mask: HF's 2-D padding mask, cut to the keys a layer sees ------------------------------

def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _check_pattern(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset,
                   local_size, device):
    """Refuse a mask function that is not causal (+ sliding window), looking at O(B * Sq) cells
    and synchronizing once.

    The kernel's pattern is: query i sees key j iff i - W < j <= i. So a query sees itself and
    the key just before it (packed sequences break this at every sequence start), not the key
    after it (bidirectional blocks break that), and with a window W the key W-1 before it but
    not the key W before it. Cells outside the keys are not looked at.
    """
    q0, first = int(q_offset), int(kv_offset)
    last = first + kv_length - 1
    probes = [(0, True, "a query does not see its own key")]
    if local_size is None or local_size >= 2:
        probes.append((-1, True, "a query does not see the key just before it: packed "
                                 "sequences (position_ids restarting inside a row) or a block "
                                 "mask. Put each sequence in its own row, with an "
                                 "attention_mask for the padding"))
    probes.append((1, False, "a query sees a later key (bidirectional or block attention)"))
    if local_size is not None:
        probes += [(1 - local_size, True, f"the sliding window is narrower than {local_size}"),
                   (-local_size, False, f"the sliding window is wider than {local_size}")]
    b = torch.arange(batch_size, device=device)[:, None]                       # (B, 1)
    h = torch.zeros((), dtype=torch.long, device=device)
    wrong, messages = [], []
    for delta, visible, message in probes:
        lo, hi = max(q0, first - delta), min(q0 + q_length - 1, last - delta)  # key inside
        if lo > hi:
            continue
        q = torch.arange(lo, hi + 1, device=device)[None, :]                   # (1, n)
        got = torch.as_tensor(mask_function(b, h, q, q + delta), device=device)
        wrong.append((got != visible).any())
        messages.append(message)
    if wrong:
        bad = torch.stack(wrong).tolist()                                       # one sync
        if any(bad):
            raise ValueError(f"gptfast attention cannot run this model's mask: "
                             f"{messages[bad.index(True)]}. The fused kernel takes a causal "
                             f"mask, a sliding window and key padding only; unpatch the model "
                             f"(gptfast.hf.unpatch) to use another pattern.")


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                 mask_function=None, attention_mask: Optional[Tensor] = None,
                 local_size: Optional[int] = None, use_vmap: bool = False,
                 device="cpu", **kwargs) -> Optional[Tensor]:
    """gptfast's entry in transformers' AttentionMaskInterface.

    Arguments are those HF passes to every mask interface (see masking_utils.sdpa_mask): the
    layer's queries sit at absolute positions [q_offset, q_offset + q_length), its keys at
    [kv_offset, kv_offset + kv_length); attention_mask is the user's 2-D mask (B, >= seen
    tokens), True = real token.

    Returns key_padding_mask (B, Sk) bool, True = real key, with Sk = q_offset + q_length -
    kv_offset <= kv_length: keys after the last query (a static cache's empty slots) are never
    visible, and cutting them aligns the kernel's bottom-right causal diagonal with HF's
    absolute positions. None when there is no padding and nothing to cut.
    """
    from transformers import masking_utils
    if use_vmap:  # set by HF exactly when a model adds or_mask_function / and_mask_function
        raise ValueError("gptfast attention cannot run this model's mask: it overlays a custom "
                         "mask function (or_mask_function / and_mask_function, e.g. bidirectional "
                         "image tokens). Unpatch the model (gptfast.hf.unpatch) to use it.")
    if mask_function not in (None, masking_utils.causal_mask_function) and not _tracing():
        _check_pattern(mask_function, batch_size, q_length, kv_length, q_offset, kv_offset,
                       local_size, device)
    config = kwargs.get("config")
    # keys [kv_offset, kv_offset + n_keys) end at the last query (a static cache keeps its
    # query offset in a tensor, read here once per forward)
    n_keys = int(q_offset) + q_length - int(kv_offset)
    if not 0 < n_keys <= kv_length:
        raise ValueError(f"gptfast attention: queries at [{int(q_offset)}, "
                         f"{int(q_offset) + q_length}) do not end inside the keys "
                         f"[{int(kv_offset)}, {int(kv_offset) + kv_length})")
    if attention_mask is None:
        if n_keys == kv_length:
            return None
        return torch.ones(batch_size, n_keys, dtype=torch.bool, device=device)
    if attention_mask.dim() != 2:
        raise ValueError(f"gptfast attention takes the 2-D attention_mask (batch, keys), got "
                         f"shape {tuple(attention_mask.shape)}")
    mask = attention_mask.to(device=device, dtype=torch.bool)
    end = int(kv_offset) + n_keys
    if mask.shape[1] < end:  # no mask entry: not a seen token (HF pads with False too)
        mask = F.pad(mask, (0, end - mask.shape[1]), value=False)
    mask = mask[:, int(kv_offset):end]
    if getattr(config, "model_type", None) == "bloom" and not _tracing():
        _check_contiguous(mask)
    return mask


def _check_contiguous(mask: Tensor) -> None:
    """BLOOM's ALiBi counts a key's position among the real tokens (cumsum of the mask); the
    kernel uses the index distance. They agree (up to a per-row constant, which softmax
    ignores) when each row's real tokens are one run: left, right or both-sided padding."""
    runs = mask[:, :1].sum(1) + (mask[:, 1:] & ~mask[:, :-1]).sum(1)          # (B,)
    if bool((runs > 1).any()):
        raise ValueError("gptfast attention on BLOOM: each attention_mask row must hold its real "
                         "tokens in one run (left or right padding); a row with holes would give "
                         "ALiBi different positions than BLOOM's")


# ---- the attention function ---------------------------------------------------------------------

def _mask_for(key: Tensor, attention_mask) -> Optional[Tensor]:
    if attention_mask is None:
        return None
    if not (isinstance(attention_mask, Tensor) and attention_mask.dim() == 2
            and attention_mask.dtype == torch.bool):
        what = (f"a {attention_mask.dim()}-D {attention_mask.dtype} tensor"
                if isinstance(attention_mask, Tensor) else type(attention_mask).__name__)
        raise ValueError(f"gptfast attention expects the (batch, keys) bool mask that gptfast's "
                         f"mask interface builds, got {what}: a mask prepared for another "
                         f"attention implementation (pass the 2-D attention_mask instead)")
    if attention_mask.shape[1] > key.shape[2]:
        raise ValueError(f"gptfast attention: the mask covers {attention_mask.shape[1]} keys, "
                         f"the layer has {key.shape[2]}")
    return attention_mask


def attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                      dropout: float = 0.0, scaling: Optional[float] = None,
                      sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs):
    """gptfast's entry in transformers' AttentionInterface.

    query (B, Hq, Sq, d), key/value (B, Hkv, Sk, d) (grouped-query heads are not repeated);
    attention_mask: what `padding_mask` built. Returns (out (B, Sq, Hq, d), None): no attention
    weights exist to return.
    """
    if is_causal is False or not getattr(module, "is_causal", True):
        raise ValueError("gptfast attention runs causal (decoder) self-attention only")
    extra = {}
    if softcap is not None:
        if not attention_takes_softcap():
            raise ValueError(f"gptfast.attention has no score softcap yet (this layer uses "
                             f"softcap={softcap}); gptfast.hf.patch keeps such models on eager")
        extra["softcap"] = softcap
    mask = _mask_for(key, attention_mask)
    if mask is not None and mask.shape[1] < key.shape[2]:  # keys after the last query
        key, value = key[:, :, :mask.shape[1]], value[:, :, :mask.shape[1]]
    out = gptfast.attention(query, key, value, causal=True, softmax_scale=scaling,
                            window=sliding_window, key_padding_mask=mask, dropout_p=dropout,
                            backend=_backend(module), **extra)                 # (B, Hq, Sq, d)
    return out.transpose(1, 2), None                                            # (B, Sq, Hq, d)


# ---- BLOOM ---------------------------------------------------------------------------------------

def bloom_attention_forward(self, hidden_states: Tensor, residual: Tensor, alibi: Tensor,
                            attention_mask, layer_past=None, use_cache: bool = False,
                            output_attentions: bool = False, **kwargs):
    """BloomAttention.forward on gptfast.attention (bound to each BloomAttention by `patch`).

    HF's `alibi` tensor (slope * position of each key) is not read: the kernel adds
    -slope * (i - j), which differs from it by a per-row constant (softmax ignores it) as long as
    each row's real tokens are contiguous, which the mask interface checks.
    Returns (output (B, S, C) with the residual added, None).
    """
    from transformers.models.bloom.modeling_bloom import dropout_add
    B, Sq, _ = hidden_states.shape
    q, k, v = self._reshape(self.query_key_value(hidden_states))                # (B, nh, Sq, hs)
    if layer_past is not None:
        k, v = layer_past.update(k, v, self.layer_idx)                          # (B, nh, Sk, hs)
    mask = _mask_for(k, attention_mask)
    if mask is not None and mask.shape[1] < k.shape[2]:
        k, v = k[:, :, :mask.shape[1]], v[:, :, :mask.shape[1]]
    slopes = getattr(self, "_gptfast_slopes", None)
    if slopes is None or slopes.device != q.device:
        from gptfast.model import alibi_slopes
        slopes = self._gptfast_slopes = alibi_slopes(self.num_heads).to(q.device)
    y = gptfast.attention(q, k, v, causal=True, softmax_scale=self.inv_norm_factor,
                          alibi_slopes=slopes, key_padding_mask=mask,
                          dropout_p=self.attention_dropout.p if self.training else 0.0,
                          backend=_backend(self))                               # (B, nh, Sq, hs)
    y = y.transpose(1, 2).reshape(B, Sq, self.num_heads * self.head_dim)        # (B, Sq, C)
    # (patch refuses slow_but_exact, BLOOM's emulation of tensor-parallel rounding)
    return dropout_add(self.dense(y), residual, self.hidden_dropout, self.training), None


__all__ = ["NAME", "attention_forward", "padding_mask", "bloom_attention_forward",
           "attention_takes_softcap"]
