"""gptfast: fused causal attention and fused linear cross-entropy for GPT models.

    import gptfast
    out = gptfast.attention(q, k, v, causal=True)              # (B, H, S, d)
    loss = gptfast.linear_cross_entropy(hidden, wte.weight, targets)

`gptfast.explain(gptfast.attention, q, k, v)` says which backend runs and why.
`gptfast.use_for_sdpa()` makes F.scaled_dot_product_attention's flash path run gptfast's kernels.
"""
from . import nn, sdpa
from .ops import (BackendError, attention, cross_entropy, explain, linear_cross_entropy,
                  report)
from .sdpa import use_for_sdpa

sdpa.register()  # known to torch.nn.attention's registry as "gptfast"; activated only on request

__version__ = "0.1.0"


def count_params(name_or_config) -> int:
    """Parameters of a preset or GPTConfig, counted on the meta device (no memory)."""
    from .model import count_params as _count
    return _count(name_or_config)


__all__ = ["attention", "cross_entropy", "linear_cross_entropy", "explain", "report",
           "BackendError", "count_params", "nn", "sdpa", "use_for_sdpa", "__version__"]
