"""nn.Module wrappers of the functional ops, for models that hold their loss as a module.

    loss_fn = gptfast.nn.LinearCrossEntropyLoss(ignore_index=-100, z_loss=1e-4)
    loss = loss_fn(hidden.view(-1, C), model.wte.weight, targets.view(-1))
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .ops import attention, cross_entropy, linear_cross_entropy


class _LossOptions(nn.Module):
    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, z_loss: float = 0.0,
                 softcap: Optional[float] = None, backend: str = "auto"):
        super().__init__()
        self.options = dict(ignore_index=ignore_index, reduction=reduction,
                            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                            backend=backend)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class CrossEntropyLoss(_LossOptions):
    """`gptfast.cross_entropy` as a module: forward(logits (..., V), targets (...))."""

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return cross_entropy(logits, targets, **self.options)


class LinearCrossEntropyLoss(_LossOptions):
    """`gptfast.linear_cross_entropy` as a module: forward(hidden (..., D), weight (V, D),
    targets (...), bias=None). The weight is an argument, not a parameter of this module, so a
    tied embedding stays owned by the model."""

    def __init__(self, *, memory_budget: Optional[int] = None,
                 filter_eps: Optional[float] = None, **options):
        super().__init__(**options)
        self.options["memory_budget"] = memory_budget
        self.options["filter_eps"] = filter_eps

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor,
                bias: Optional[Tensor] = None) -> Tensor:
        return linear_cross_entropy(hidden, weight, targets, bias=bias, **self.options)


class CausalAttention(nn.Module):
    """`gptfast.attention` as a module: forward(q, k, v, key_padding_mask=None), applying
    `dropout_p` only in training mode (as nn.Dropout does)."""

    def __init__(self, *, causal: bool = True, softmax_scale: Optional[float] = None,
                 window: Optional[int] = None, dropout_p: float = 0.0,
                 deterministic: bool = False, backend: str = "auto"):
        super().__init__()
        self.causal, self.softmax_scale, self.window = causal, softmax_scale, window
        self.dropout_p, self.deterministic, self.backend = dropout_p, deterministic, backend

    def forward(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
                alibi_slopes: Optional[Tensor] = None) -> Tensor:
        return attention(q, k, v, causal=self.causal, softmax_scale=self.softmax_scale,
                         window=self.window, key_padding_mask=key_padding_mask,
                         alibi_slopes=alibi_slopes,
                         dropout_p=self.dropout_p if self.training else 0.0,
                         deterministic=self.deterministic, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"causal={self.causal}, window={self.window}, dropout_p={self.dropout_p}, "
                f"backend={self.backend!r}")


__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss", "CausalAttention"]
