"""gptfast: fused causal attention and fused linear cross-entropy for GPT models.

    import gptfast
    out = gptfast.attention(q, k, v, causal=True)              # (B, H, S, d)
    loss = gptfast.linear_cross_entropy(hidden, wte.weight, targets)
    gptfast.linear_cross_entropy_memory(N, D, V, dtype=torch.bfloat16)  # its peak, planned

`gptfast.explain(gptfast.attention, q, k, v)` says which backend runs and why.
`gptfast.use_for_sdpa()` makes F.scaled_dot_product_attention's flash path run gptfast's kernels.
`gptfast.hf.patch(model)` runs a transformers model's attention and loss on them (gptfast.hf).
"""
from . import nn, sdpa
from .ops import (LINEAR_CE_BUDGET, BackendError, attention, cross_entropy, linear_cross_entropy,
                  linear_cross_entropy_memory, report)
from .ops import explain as _explain_op
from .sdpa import use_for_sdpa

sdpa.register()  # known to torch.nn.attention's registry as "gptfast"; activated only on request

__version__ = "0.1.0"


def explain(op, *args, **kwargs):
    """Which backend runs, and why each other one would not.

    explain(gptfast.attention, q, k, v, ...)   an op on given inputs (nothing is computed)
    explain("gpt2") / explain(config) / explain(model)
        the model's attention and loss in a training step here (keyword arguments: device,
        batch_size, seq_len, training, dtype; see gptfast.model.explain_paths)
    `print(...)` the result: one block per op, the backend it runs on, why the others cannot,
    and for the "torch" backend which path it takes (a fused PyTorch kernel or the plain
    reference that materializes S x S attention scores).
    """
    from .model import GPT, PRESETS, GPTConfig, explain_paths
    if isinstance(op, (GPT, GPTConfig)) or (isinstance(op, str) and op in PRESETS):
        return explain_paths(op, *args, **kwargs)
    return _explain_op(op, *args, **kwargs)


def load(path, device="cpu"):
    """A trained model from a checkpoint file or a run folder -> (model, tokenizer).

    The model is in eval mode on `device`: a `gptfast.model.GPT` from `gptfast train`, or a
    `GPTForSequenceClassification` (with `.labels`, the class names) from `gptfast finetune`.
    Raises `gptfast.checkpoint.CheckpointError` for a file that is not a loadable checkpoint,
    or one whose weights are not finite (a run that diverged).
    """
    from .train import load_any
    model, tok, _ = load_any(path, device)
    return model, tok


def __getattr__(name):
    # gptfast.hf (Hugging Face models) loads on first use: `import gptfast` stays light
    if name == "hf":
        import importlib
        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module 'gptfast' has no attribute {name!r}")


def count_params(name_or_config) -> int:
    """Parameters of a preset or GPTConfig, counted on the meta device (no memory)."""
    from .model import count_params as _count
    return _count(name_or_config)


__all__ = ["attention", "cross_entropy", "linear_cross_entropy", "linear_cross_entropy_memory",
           "LINEAR_CE_BUDGET", "explain", "report",
           "BackendError", "count_params", "load", "nn", "sdpa", "use_for_sdpa", "__version__"]
