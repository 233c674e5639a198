"""Triton kernels and their thin launchers (installed as `gptfast.kernels`).

No autograd and no tests live here: `gptfast/ops/` wraps the launchers into custom ops.
  attention.py       FlashAttention-2-style causal attention, forward and backward
  cross_entropy.py   cross-entropy over logits, and fused linear (tied-embedding) cross-entropy
  _grid.py           CUDA's launch-grid limits, checked by every launcher
  _interpreter.py    bf16 under TRITON_INTERPRET=1: a self-test of Triton's interpreter, its fix,
                     or a clear refusal (`ensure_bf16`, called by every launcher)
"""
