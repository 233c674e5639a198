"""The language-model loss of a Hugging Face *ForCausalLM from gptfast.linear_cross_entropy.

HF computes `logits = lm_head(hidden)` (B, S, V) and then cross-entropy over them; at a 50k-256k
vocabulary those logits (and their fp32 copy and gradient) dominate training memory. With labels,
the patched forward runs the model's own forward with no logits kept (`logits_to_keep` = no
position), takes the final hidden states from its base model, and computes the loss with the
fused op on the output embedding (tied or not): no (B*S, V) tensor exists, and `logits` is None
in the output, as with Liger Kernel. Without labels the model's forward runs unchanged.

The loss is HF's ForCausalLMLoss: labels shifted left by one (or `shift_labels` as given),
ignore_index -100, mean over the counted tokens, or sum / num_items_in_batch when the Trainer
passes num_items_in_batch (gradient accumulation); Gemma-2's final logit softcap is the op's
`softcap`.
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import gptfast


def causal_lm_loss(hidden: Tensor, weight: Tensor, labels: Optional[Tensor], *,
                   bias: Optional[Tensor] = None, shift_labels: Optional[Tensor] = None,
                   ignore_index: int = -100, num_items_in_batch=None,
                   softcap: Optional[float] = None, backend: str = "auto") -> Tensor:
    """HF's causal-LM loss of `hidden @ weight.T (+ bias)` without the logits.

    hidden (B, S, C); weight (V, C); labels (B, S): token t is predicted at position t - 1, the
    last position predicts nothing. shift_labels (B, S), already aligned, replaces labels.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]        # (B, S)
    targets = shift_labels.reshape(-1).to(hidden.device)                        # (B*S,)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = gptfast.linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, targets,
                                        bias=bias, ignore_index=ignore_index,
                                        reduction=reduction, softcap=softcap, backend=backend)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


class _HiddenCapture:
    """Forward hook on the base model: keeps its output's first field (the final hidden states,
    after the final norm) while `armed`, so the LM forward need not be rewritten."""

    def __init__(self):
        self.armed, self.hidden = False, None

    def __call__(self, module, args, output):
        if self.armed:
            self.hidden = output[0]  # ModelOutput and tuple outputs alike: last_hidden_state


def fused_loss_forward(model, *, softcap: Optional[float], backend: str):
    """A forward for `model` (a *ForCausalLM): its original forward, with the loss fused when
    labels are given. Returns (forward, hook handle)."""
    original = model.forward  # the class's bound method, or a wrapper another library set
    # positional arguments are named after the class's forward (a wrapper may take *args)
    names = [p.name for p in inspect.signature(type(model).forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]  # without self
    capture = _HiddenCapture()
    handle = model.base_model.register_forward_hook(capture)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        if len(args) > len(names):
            raise TypeError(f"{type(model).__name__}.forward takes {len(names)} positional "
                            f"arguments, got {len(args)}")
        kwargs.update(zip(names, args))  # positional arguments by name: labels may be one
        labels = kwargs.pop("labels", None)
        if labels is None:  # HF computes a loss only when labels are given
            return original(**kwargs)
        shift_labels = kwargs.pop("shift_labels", None)
        keep = kwargs.pop("logits_to_keep", 0)
        if not (isinstance(keep, int) and keep == 0):
            raise ValueError("gptfast.hf: logits_to_keep with labels is not supported (the "
                             "fused loss covers every position and keeps no logits)")
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(model.config, "return_dict", True)
        loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch", "ignore_index")
                       if k in kwargs}
        no_position = torch.empty(0, dtype=torch.long)
        capture.armed = True
        try:
            out = original(**kwargs, logits_to_keep=no_position, return_dict=True)
            hidden = capture.hidden
        finally:
            capture.armed, capture.hidden = False, None
        head = model.get_output_embeddings()
        loss = causal_lm_loss(hidden, head.weight, labels, bias=head.bias,
                              shift_labels=shift_labels, softcap=softcap, backend=backend,
                              **loss_kwargs)
        fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
        out = type(out)(loss=loss, **fields)  # logits None, as with Liger Kernel
        return out if return_dict else out.to_tuple()

    return forward, handle


__all__ = ["causal_lm_loss", "fused_loss_forward"]
