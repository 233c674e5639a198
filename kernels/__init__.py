"""Triton kernels and their thin launchers (installed as `gptfast.kernels`).

No autograd and no tests live here: `gptfast/ops/` wraps the launchers into custom ops.
  attention.py       FlashAttention-2-style causal attention, forward and backward
  cross_entropy.py   cross-entropy over logits, and fused linear (tied-embedding) cross-entropy
"""
