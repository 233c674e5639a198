"""Every gptfast operator schema, declared once, with its fake (meta) implementation.

One operator per (kernel backend, op): `gptfast::triton_<op>` and `gptfast::cuda_<op>` have
identical schemas. Implementations register against these names per dispatch key:
  triton_*   from Python (`_triton.py`), for CUDA and for CPU (the Triton interpreter in CI);
  cuda_*     from the C++ extension `gptfast._C` (`TORCH_LIBRARY_IMPL(gptfast, CUDA, m)`, and
             `TORCH_LIBRARY_IMPL(gptfast, CPU, m)` for its CPU execution layer).
No op takes a backend name, and no op has autograd: each op family's `torch.autograd.Function`
(`attention.py`, `cross_entropy.py`) picks the op for the chosen backend and calls it. The
"torch" backend is plain PyTorch and has no op.

Conventions every implementation follows (the fakes below are the contract; opcheck checks it):
  * Outputs are freshly allocated, contiguous, on the inputs' device.
  * lse / loss outputs are fp32 (fp64 for fp64 inputs); other outputs have their input's dtype.
  * Optional tensor inputs may be None; an absent bias gradient is a 0-element tensor (an op
    cannot return None).
  * Upstream gradients (dout, grad_rows, grad_lse) may have any strides, stride 0 included.
  * reduction is at::Reduction's int: 0 none, 1 mean, 2 sum.

Attention (q (B, Hq, Sq, d), k/v (B, Hkv, Sk, d), Hkv divides Hq; only the last dim needs to be
contiguous; semantics in `gptfast.attention`'s docstring: causal mask aligned bottom-right,
window W with causal, ALiBi slopes (Hq,) fp32, key_padding_mask (B, Sk) bool True = real key,
seed (1,) int64 for dropout, drawn by the caller so backward regenerates the same mask;
softcap c > 0 or None: scores c * tanh(scale * q.k / c) before the ALiBi bias and the masks,
as FlashAttention 2.6 and Gemma-2 do; last in both schemas, with a default, so callers that
predate it need not pass it):
  attention_fwd -> out (B, Hq, Sq, d), lse (B, Hq, Sq) fp32 (-inf for a row that sees no key)
  attention_bwd -> dq, dk, dv (dk/dv summed over each query-head group); dlse may be None

Cross-entropy over logits (N, V), last dim contiguous, targets (N,) int64:
  cross_entropy_fwd  -> loss_rows (N,), lse (N,)
  cross_entropy_bwd  -> dlogits (N, V)
  cross_entropy_bwd_ -> writes dlogits into `logits` (mutates it; returns nothing)
Linear cross-entropy of hidden (N, D) @ weight (V, D).T (+ bias (V,)), logits never stored:
  linear_cross_entropy_fwd      -> loss_rows (N,), lse (N,)
  linear_cross_entropy_bwd      -> dhidden, dweight, dbias (0 elements without bias);
                                   filter_eps (None: off) lets a kernel skip the back-products
                                   of a tile whose every gradient entry is below filter_eps x
                                   its row's upstream gradient (|grad_rows| + |grad_lse|)
  linear_cross_entropy_fwd_grad -> the budgeted schedule: (loss (reduced, 0-d), lse, dhidden,
                                   dweight, dbias) with the gradients for a unit upstream
                                   gradient of the reduced loss; reduction 1 (mean) or 2 (sum);
                                   memory_budget bytes of working memory
"""
from __future__ import annotations

import torch

NAMESPACE = "gptfast"
KERNEL_BACKENDS = ("cuda", "triton")

_CE_OPTS = "int ignore_index, float label_smoothing, float z_loss, float? softcap"

# op name -> schema without the name: identical for every kernel backend.
SCHEMAS = {
    "attention_fwd":
        "(Tensor q, Tensor k, Tensor v, Tensor? alibi_slopes, Tensor? key_padding_mask, "
        "Tensor? seed, bool causal, float softmax_scale, int? window, float dropout_p, "
        "float? softcap=None) -> (Tensor out, Tensor lse)",
    "attention_bwd":
        "(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? alibi_slopes, Tensor? key_padding_mask, Tensor? seed, bool causal, "
        "float softmax_scale, int? window, float dropout_p, bool deterministic, "
        "float? softcap=None) -> (Tensor dq, Tensor dk, Tensor dv)",
    "cross_entropy_fwd":
        f"(Tensor logits, Tensor targets, {_CE_OPTS}) -> (Tensor loss_rows, Tensor lse)",
    "cross_entropy_bwd":
        f"(Tensor? grad_rows, Tensor? grad_lse, Tensor logits, Tensor targets, Tensor lse, "
        f"{_CE_OPTS}) -> Tensor",
    "cross_entropy_bwd_":
        f"(Tensor? grad_rows, Tensor? grad_lse, Tensor(a!) logits, Tensor targets, Tensor lse, "
        f"{_CE_OPTS}) -> ()",
    "linear_cross_entropy_fwd":
        f"(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, {_CE_OPTS}) "
        f"-> (Tensor loss_rows, Tensor lse)",
    "linear_cross_entropy_bwd":
        f"(Tensor? grad_rows, Tensor? grad_lse, Tensor hidden, Tensor weight, Tensor targets, "
        f"Tensor? bias, Tensor lse, {_CE_OPTS}, float? filter_eps=None) "
        f"-> (Tensor dhidden, Tensor dweight, Tensor dbias)",
    "linear_cross_entropy_fwd_grad":
        f"(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, {_CE_OPTS}, "
        f"int reduction, int memory_budget) "
        f"-> (Tensor loss, Tensor lse, Tensor dhidden, Tensor dweight, Tensor dbias)",
}

# at::Reduction, the int PyTorch's own loss ops take.
REDUCTION = {"none": 0, "mean": 1, "sum": 2}


def qualname(backend: str, op: str) -> str:
    return f"{NAMESPACE}::{backend}_{op}"


def schema(backend: str, op: str) -> str:
    """The full schema string of `gptfast::<backend>_<op>`."""
    return f"{backend}_{op}{SCHEMAS[op]}"


# ---- fakes: shapes, dtypes and strides of the outputs, shared by every backend ----------------

def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_attention_fwd(q, k, v, alibi_slopes, key_padding_mask, seed, causal, softmax_scale,
                        window, dropout_p, softcap=None):
    B, H, S, d = q.shape
    return q.new_empty((B, H, S, d)), q.new_empty((B, H, S), dtype=torch.float32)


def _fake_attention_bwd(dout, dlse, q, k, v, out, lse, alibi_slopes, key_padding_mask, seed,
                        causal, softmax_scale, window, dropout_p, deterministic, softcap=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fake_ce_fwd(logits, targets, ignore_index, label_smoothing, z_loss, softcap):
    n, acc = logits.shape[0], _acc(logits.dtype)
    return logits.new_empty(n, dtype=acc), logits.new_empty(n, dtype=acc)


def _fake_ce_bwd(grad_rows, grad_lse, logits, targets, lse, ignore_index, label_smoothing,
                 z_loss, softcap):
    return logits.new_empty(logits.shape)


def _fake_ce_bwd_(grad_rows, grad_lse, logits, targets, lse, ignore_index, label_smoothing,
                  z_loss, softcap):
    return None


def _fake_bias_grad(hidden, bias):
    return bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0)


def _fake_lce_fwd(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, softcap):
    n, acc = hidden.shape[0], _acc(hidden.dtype)
    return hidden.new_empty(n, dtype=acc), hidden.new_empty(n, dtype=acc)


def _fake_lce_bwd(grad_rows, grad_lse, hidden, weight, targets, bias, lse, ignore_index,
                  label_smoothing, z_loss, softcap, filter_eps=None):
    return (hidden.new_empty(hidden.shape), weight.new_empty(weight.shape),
            _fake_bias_grad(hidden, bias))


def _fake_lce_fwd_grad(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss,
                       softcap, reduction, memory_budget):
    n, acc = hidden.shape[0], _acc(hidden.dtype)
    return (hidden.new_empty((), dtype=acc), hidden.new_empty(n, dtype=acc),
            hidden.new_empty(hidden.shape), weight.new_empty(weight.shape),
            _fake_bias_grad(hidden, bias))


FAKES = {
    "attention_fwd": _fake_attention_fwd,
    "attention_bwd": _fake_attention_bwd,
    "cross_entropy_fwd": _fake_ce_fwd,
    "cross_entropy_bwd": _fake_ce_bwd,
    "cross_entropy_bwd_": _fake_ce_bwd_,
    "linear_cross_entropy_fwd": _fake_lce_fwd,
    "linear_cross_entropy_bwd": _fake_lce_bwd,
    "linear_cross_entropy_fwd_grad": _fake_lce_fwd_grad,
}


# ---- the declarations ------------------------------------------------------------------------

# Held for the life of the process: dropping a Library object deregisters its operators.
_LIB = torch.library.Library(NAMESPACE, "DEF")
for _backend in KERNEL_BACKENDS:
    for _op in SCHEMAS:
        # pt2_compliant: the ops trace under torch.compile (fakes below, no data-dependent
        # output shapes); opcheck verifies the claim.
        _LIB.define(schema(_backend, _op), tags=(torch.Tag.pt2_compliant_tag,))
        torch.library.register_fake(qualname(_backend, _op), FAKES[_op], lib=_LIB)


def op(backend: str, name: str) -> "torch._ops.OpOverload":
    """The OpOverload `torch.ops.gptfast.<backend>_<name>.default`."""
    return getattr(getattr(torch.ops, NAMESPACE), f"{backend}_{name}").default


# ---- calling an op ---------------------------------------------------------------------------

# (backend, op name) -> the OpOverload, and -> the Python function registered as its kernel
# (Triton's), which an eager call on plain tensors may run without the dispatcher.
OPS = {(b, name): op(b, name) for b in KERNEL_BACKENDS for name in SCHEMAS}
PY_KERNELS: dict = {}
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def kernel(backend: str, name: str, *tensors):
    """What an autograd.Function calls for `gptfast::<backend>_<name>`.

    The op itself, except in the one case where the dispatcher adds nothing but its cost: a
    Python kernel (Triton's; boxing its ~10 arguments into and out of the dispatcher costs
    ~7 us a call, as much as the rest of the boundary) called eagerly on plain tensors, with no
    dispatch mode (fake tensors, make_fx, FlopCounter), functorch transform or jit trace
    active. Then the kernel function runs directly. torch.compile, export, opcheck and C++
    kernels always go through the op.
    """
    py = PY_KERNELS.get((backend, name))
    if (py is None or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._are_functorch_transforms_active() or torch._C._get_tracing_state()):
        return OPS[(backend, name)]
    for t in tensors:
        if type(t) not in _PLAIN:  # a tensor subclass (fake, functional, DTensor, ...)
            return OPS[(backend, name)]
    return py
