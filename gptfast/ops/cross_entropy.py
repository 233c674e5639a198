"""`gptfast.cross_entropy` and `gptfast.linear_cross_entropy`.

Layers, thinnest on top:
  cross_entropy(), linear_cross_entropy()   public functions: checks, autocast, backend choice
  _CrossEntropy, _LinearCrossEntropy,       autograd.Functions: save what backward needs, reduce
  _LinearCrossEntropyBudgeted               the rows (mean/sum) without autograd nodes, call the
                                            backend's ops
  gptfast::<backend>_cross_entropy_*,       the ops (schemas and fakes in `_library.py`)
  gptfast::<backend>_linear_cross_entropy_*
  kernels/cross_entropy.py                  the Triton kernels (csrc/ for CUDA C++)
The "torch" backend is plain PyTorch: `reference.cross_entropy` (differentiable) over logits;
for linear cross-entropy the chunked reference, with its hand-written backward, runs inside the
same autograd.Functions as the kernels (it never holds the N x V logits).

linear_cross_entropy has two schedules (see kernels/cross_entropy.py for their costs, and
kernels/cross_entropy_plan.py for their memory, which `linear_cross_entropy_memory` reports):
  lean      (default): forward keeps only the per-row lse; backward recomputes the logits.
  budgeted  (memory_budget > LEAN_BUDGET, reduction mean/sum, gradients wanted): the gradients
            are computed in the forward for a unit upstream gradient, and backward only scales
            them (in place, unless the graph is kept). The "torch" backend on CPU tensors uses
            this one-pass schedule by default (memory_budget=None) with its small chunks: the
            gradients it holds are the ones backward would allocate anyway. An lse gradient (return_lse=True and lse used in the loss) falls back to the
            lean backward for that part.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from gptfast.kernels import cross_entropy_plan as _plan

from . import backends, reference
from ._checks import (FLOAT_DTYPES, autocast_on, check_choice, check_range,
                      check_same_device, check_same_dtype, check_tensor, follow_autocast)
from ._library import REDUCTION, kernel

REDUCTIONS = ("mean", "sum", "none")
LEAN_BUDGET = _plan.LEAN_MAX_BUDGET  # bytes: a budget at most this runs the lean schedule
LINEAR_CE_BUDGET = _plan.DEFAULT_BUDGET  # the budgeted schedule's recommended budget (384 MiB)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


# ---- kernel backends: what each supports -------------------------------------------------------

class Facts(NamedTuple):
    dtype: torch.dtype


def _triton_support(f: Facts) -> Optional[str]:
    if f.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {f.dtype} is not supported (fp16, bf16, fp32)"
    return None


for _op in ("cross_entropy", "linear_cross_entropy"):
    backends.register_support(_op, "triton", _triton_support)


def _cuda_support(f: Facts) -> Optional[str]:
    """The CUDA C++ row kernels (csrc/cross_entropy/cross_entropy.cu)."""
    if f.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {f.dtype} is not supported (fp16, bf16, fp32)"
    return None


def _cuda_linear_support(f: Facts) -> Optional[str]:
    """The CUDA C++ linear kernels (csrc/cross_entropy/linear_cross_entropy.cu): mma.sync tiles."""
    return backends.mma_sync_dtype_problem(f.dtype)


backends.register_support("cross_entropy", "cuda", _cuda_support)
backends.register_support("linear_cross_entropy", "cuda", _cuda_linear_support)


# ---- the "torch" backend of linear cross-entropy, in the ops' signatures -----------------------

def _torch_lce_fwd(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, softcap,
                   memory_budget=None):
    return reference.linear_cross_entropy_forward(
        hidden, weight, targets, bias, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        chunk_elements=reference.chunk_elements(memory_budget, softcap))


def _torch_lce_bwd(grad_rows, grad_lse, hidden, weight, targets, bias, lse, ignore_index,
                   label_smoothing, z_loss, softcap, memory_budget=None):
    dh, dw, db = reference.linear_cross_entropy_backward(
        grad_rows, grad_lse, hidden, weight, targets, bias, lse, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        chunk_elements=reference.chunk_elements(memory_budget, softcap))
    return dh, dw, db if db is not None else hidden.new_empty(0)


def _torch_lce_fwd_grad(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss,
                        softcap, reduction, memory_budget):
    name = "mean" if reduction == REDUCTION["mean"] else "sum"
    loss_rows, lse, (dh, dw, db) = reference.linear_cross_entropy_forward_with_grad(
        hidden, weight, targets, bias, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, reduction=name,
        chunk_elements=reference.chunk_elements(memory_budget, softcap))
    loss = reference.reduce_rows(loss_rows, targets, ignore_index, name)
    return loss, lse, dh, dw, db if db is not None else hidden.new_empty(0)


# ---- reduction inside the Functions (no autograd nodes for sum / divide) ------------------------

def _reduce(loss_rows: Tensor, targets: Tensor, ignore_index: int, reduction: str):
    """(loss, count): the reduced loss the way F.cross_entropy reduces (mean over non-ignored
    rows; all ignored: 0 for sum, NaN for mean) and, for mean, the count backward divides by."""
    if reduction == "none":
        return loss_rows, None
    if reduction == "sum":
        return loss_rows.sum(), None
    # the count in the loss's dtype: no type promotion in the divisions here and in backward
    count = targets.ne(ignore_index).sum(dtype=loss_rows.dtype)
    return loss_rows.sum() / count, count


def _grad_rows(grad_loss: Optional[Tensor], count: Optional[Tensor], reduction: str, n: int):
    """Per-row upstream gradient of the reduced loss: stride 0 for mean/sum (kernels take
    strides), None when the loss was not used."""
    if grad_loss is None or reduction == "none":
        return grad_loss
    if reduction == "mean":
        grad_loss = grad_loss / count
    return grad_loss.expand(n)


# ---- autograd: cross-entropy over given logits (kernel backends) --------------------------------

class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index, label_smoothing, z_loss, softcap, reduction,
                inplace_backward, backend):
        loss_rows, lse = kernel(backend, "cross_entropy_fwd", logits)(
            logits, targets, ignore_index, label_smoothing, z_loss, softcap)
        loss, count = _reduce(loss_rows, targets, ignore_index, reduction)
        ctx.set_materialize_grads(False)  # an unused lse gets None, not a tensor of zeros
        ctx.save_for_backward(logits, targets, lse, count)
        ctx.args = (ignore_index, label_smoothing, z_loss, softcap)
        ctx.reduction, ctx.inplace_backward, ctx.backend = reduction, inplace_backward, backend
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        if grad_loss is None and grad_lse is None:  # neither output was used
            return (None,) * 9
        logits, targets, lse, count = ctx.saved_tensors
        g = _grad_rows(grad_loss, count, ctx.reduction, logits.shape[0])
        if ctx.inplace_backward:
            kernel(ctx.backend, "cross_entropy_bwd_", logits)(g, grad_lse, logits, targets, lse,
                                                             *ctx.args)
            dlogits = logits
        else:
            dlogits = kernel(ctx.backend, "cross_entropy_bwd", logits)(
                g, grad_lse, logits, targets, lse, *ctx.args)
        return dlogits, None, None, None, None, None, None, None, None


# ---- autograd: linear cross-entropy, lean schedule (every backend) -------------------------------

class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss,
                softcap, reduction, memory_budget, backend, filter_eps=None):
        opts = (ignore_index, label_smoothing, z_loss, softcap)
        if backend == "torch":
            loss_rows, lse = _torch_lce_fwd(hidden, weight, targets, bias, *opts, memory_budget)
        else:
            loss_rows, lse = kernel(backend, "linear_cross_entropy_fwd", hidden, weight)(
                hidden, weight, targets, bias, *opts)
        loss, count = _reduce(loss_rows, targets, ignore_index, reduction)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, targets, bias, lse, count)
        ctx.args = opts
        ctx.reduction, ctx.memory_budget, ctx.backend = reduction, memory_budget, backend
        ctx.filter_eps = filter_eps
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        if grad_loss is None and grad_lse is None:  # neither output was used
            return (None,) * 12
        hidden, weight, targets, bias, lse, count = ctx.saved_tensors
        g = _grad_rows(grad_loss, count, ctx.reduction, hidden.shape[0])
        if ctx.backend == "torch":  # computes every gradient entry: filter_eps does not apply
            dh, dw, db = _torch_lce_bwd(g, grad_lse, hidden, weight, targets, bias, lse,
                                        *ctx.args, ctx.memory_budget)
        else:
            dh, dw, db = kernel(ctx.backend, "linear_cross_entropy_bwd", hidden, weight)(
                g, grad_lse, hidden, weight, targets, bias, lse, *ctx.args, ctx.filter_eps)
        return (dh, dw, None, db if bias is not None else None,
                None, None, None, None, None, None, None, None)


# ---- autograd: linear cross-entropy, budgeted schedule -----------------------------------------

def _graph_is_freed_after_this_backward(saved: Tensor) -> bool:
    """False under retain_graph=True (the saved tensors will be read again), while tracing
    (torch.compile, opcheck: fake tensors, dispatch modes) and whenever it cannot be told."""
    from torch._subclasses.fake_tensor import is_fake
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    if (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
            or is_fake(saved) or type(saved) is not torch.Tensor):
        return False
    try:
        return not torch._C._autograd._get_current_graph_task_keep_graph()
    except (AttributeError, RuntimeError):
        return False


class _LinearCrossEntropyBudgeted(torch.autograd.Function):
    """Gradients computed in forward for a unit upstream gradient of the reduced loss; backward
    scales them (and adds the lean backward of an lse gradient, when the lse is used)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss,
                softcap, reduction, memory_budget, backend):
        opts = (ignore_index, label_smoothing, z_loss, softcap)
        if backend == "torch":
            fwd_grad = _torch_lce_fwd_grad
        else:
            fwd_grad = kernel(backend, "linear_cross_entropy_fwd_grad", hidden, weight)
        loss, lse, dh, dw, db = fwd_grad(hidden, weight, targets, bias, *opts,
                                         REDUCTION[reduction], memory_budget)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, targets, bias, lse, dh, dw, db)
        ctx.args = opts
        ctx.memory_budget, ctx.backend = memory_budget, backend
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        if grad_loss is None and grad_lse is None:  # neither output was used
            return (None,) * 11
        hidden, weight, targets, bias, lse, dh, dw, db = ctx.saved_tensors
        if grad_loss is None:
            dh, dw, db = torch.zeros_like(dh), torch.zeros_like(dw), torch.zeros_like(db)
        elif _graph_is_freed_after_this_backward(dw):
            # The saved gradients are used this once: scale them in place (no second buffer
            # the size of the weight's gradient).
            dh, dw, db = dh.mul_(grad_loss), dw.mul_(grad_loss), db.mul_(grad_loss)
        else:
            dh, dw, db = dh * grad_loss, dw * grad_loss, db * grad_loss
        if grad_lse is not None:  # rare: the lse itself is in the loss; recompute that part
            if ctx.backend == "torch":
                eh, ew, eb = _torch_lce_bwd(None, grad_lse, hidden, weight, targets, bias, lse,
                                            *ctx.args, ctx.memory_budget)
            else:
                eh, ew, eb = kernel(ctx.backend, "linear_cross_entropy_bwd", hidden, weight)(
                    None, grad_lse, hidden, weight, targets, bias, lse, *ctx.args)
            dh, dw, db = dh + eh, dw + ew, db + eb
        return (dh, dw, None, db if bias is not None else None,
                None, None, None, None, None, None, None)


# ---- public functions ------------------------------------------------------------------------

def _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap):
    if (type(ignore_index) is int and reduction in REDUCTIONS and label_smoothing == 0.0
            and z_loss == 0.0 and softcap is None):
        return  # the defaults: nothing more to look at
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    check_choice("reduction", reduction, REDUCTIONS)
    check_range("label_smoothing", float(label_smoothing), 0.0, 1.0)
    if not float(z_loss) >= 0.0:
        raise ValueError(f"z_loss: expected a value >= 0, got {z_loss!r}")
    if softcap is not None and not float(softcap) > 0.0:
        raise ValueError(f"softcap: expected None or a value > 0, got {softcap!r}")


def _check_targets(targets: Tensor, lead_shape, V: int, ignore_index: int, validate: bool,
                   arg: str) -> Tensor:
    if not (isinstance(targets, Tensor) and targets.dtype in INT_DTYPES):
        check_tensor("targets", targets, dtypes=INT_DTYPES)
    if targets.shape != lead_shape:
        raise ValueError(f"targets: expected shape {tuple(lead_shape)} (the leading dims of "
                         f"{arg}), got {tuple(targets.shape)}")
    if targets.dim() != 1:
        targets = targets.reshape(-1)
    if targets.dtype != torch.int64:
        targets = targets.long()
    # On the CPU the check is cheap; on a GPU it would cost a host sync, so there it runs only
    # with validate=True (otherwise those rows give a NaN loss). Never inside torch.compile.
    if ((validate or targets.device.type == "cpu") and targets.numel()
            and not torch.compiler.is_compiling()):
        lo, hi = torch.aminmax(targets)
        if int(lo) < 0 or int(hi) >= V:  # rare: look closer (ignore_index may be out of range)
            bad = ((targets < 0) | (targets >= V)) & (targets != ignore_index)
            if bool(bad.any()):
                idx = int(bad.nonzero()[0, 0])
                raise ValueError(f"targets: expected class indices in [0, {V}) or ignore_index="
                                 f"{ignore_index}; got {int(targets[idx])} at flat index {idx}")
    return targets


def _finish(loss_rows, lse, targets, lead_shape, ignore_index, reduction, return_lse):
    if reduction == "none":
        loss = loss_rows.view(lead_shape)
    else:
        loss = reference.reduce_rows(loss_rows, targets, ignore_index, reduction)
    return (loss, lse.view(lead_shape)) if return_lse else loss


def _plan_ce(logits, targets, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
             z_loss=0.0, softcap=None, return_lse=False, validate=False, backend="auto"):
    if not (isinstance(logits, Tensor) and logits.dtype in FLOAT_DTYPES):
        check_tensor("logits", logits, dtypes=FLOAT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    device = logits.device
    if not (isinstance(targets, Tensor) and targets.device == device):
        check_same_device(logits=logits, targets=targets)
    _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    t = _check_targets(targets, logits.shape[:-1], logits.shape[-1], ignore_index, validate,
                       "logits")
    if autocast_on():
        (logits,) = follow_autocast(device, logits)
    decision = backends.choose("cross_entropy", backend, device, Facts(logits.dtype))
    return decision, logits, t


def cross_entropy(logits: Tensor, targets: Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                  softcap: Optional[float] = None, return_lse: bool = False,
                  validate: bool = False, inplace_backward: bool = False,
                  backend: str = "auto"):
    """Softmax cross-entropy over the last dim, fused: one pass per row, no softmax stored.

    logits (..., V) fp16/bf16/fp32 (fp64 on "torch"); targets (...) integer class ids.
    Matches `F.cross_entropy(logits.view(-1, V).float(), targets.view(-1), ...)` with:
      ignore_index   rows with this target cost nothing and count for nothing (mean divides by
                     the number of other rows; all ignored: 0 for sum, NaN for mean);
      label_smoothing  PyTorch's definition;
      z_loss         adds z_loss * lse**2 per row (reduced like the loss, PaLM's auxiliary loss);
      softcap        logits -> softcap * tanh(logits / softcap) first (Gemma 2).
    Targets outside [0, V) raise on CPU; on GPU those rows give NaN unless validate=True, which
    checks (a host sync) and raises. The loss is fp32 (fp64 for fp64 logits). With return_lse=True returns
    (loss, lse) with lse (...) fp32, differentiable.
    inplace_backward=True lets a kernel backend write the gradient into the logits buffer
    (half the memory): the logits' values are gone after backward, and a backend that cannot
    write in place (the "torch" reference) ignores the flag.
    """
    decision, x, t = _plan_ce(logits, targets, ignore_index=ignore_index, reduction=reduction,
                              label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                              validate=validate, backend=backend)
    lead = logits.shape[:-1]
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    opts = (ignore_index, float(label_smoothing), float(z_loss),
            float(softcap) if softcap is not None else None)
    if decision.backend == "torch":
        loss_rows, lse = reference.cross_entropy(
            x, t, ignore_index=opts[0], label_smoothing=opts[1], z_loss=opts[2], softcap=opts[3])
        return _finish(loss_rows, lse, t, lead, ignore_index, reduction, return_lse)
    if torch.is_grad_enabled() and x.requires_grad:
        loss, lse = _CrossEntropy.apply(x, t, *opts, reduction, bool(inplace_backward),
                                        decision.backend)
    else:
        loss_rows, lse = kernel(decision.backend, "cross_entropy_fwd", x)(x, t, *opts)
        loss, _ = _reduce(loss_rows, t, ignore_index, reduction)
    return _shape(loss, lse, lead, reduction, return_lse)


def _shape(loss, lse, lead, reduction, return_lse):
    if len(lead) != 1:  # rows back to the leading dims of the input
        if reduction == "none":
            loss = loss.view(lead)
        lse = lse.view(lead)
    return (loss, lse) if return_lse else loss


def _plan_lce(hidden, weight, targets, *, bias=None, ignore_index=-100, reduction="mean",
              label_smoothing=0.0, z_loss=0.0, softcap=None, return_lse=False, validate=False,
              memory_budget=None, filter_eps=None, backend="auto"):
    if not (isinstance(hidden, Tensor) and isinstance(weight, Tensor)
            and hidden.dtype in FLOAT_DTYPES and weight.dtype in FLOAT_DTYPES
            and weight.dim() == 2):
        check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
        check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, what="(V, D)")
    V, D = weight.shape
    if hidden.dim() < 1 or hidden.shape[-1] != D:
        raise ValueError(f"hidden: expected shape (..., {D}) to match weight "
                         f"(V, D) = {tuple(weight.shape)}, got {tuple(hidden.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, what="(V,)")
        if bias.shape[0] != V:
            raise ValueError(f"bias: expected shape ({V},), got {tuple(bias.shape)}")
    if memory_budget is not None and (not isinstance(memory_budget, int) or memory_budget < 0):
        raise ValueError(f"memory_budget: expected None or a number of bytes >= 0, got "
                         f"{memory_budget!r}")
    if filter_eps is not None:
        if isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float)) \
                or not 0.0 < float(filter_eps) < 1.0:
            raise ValueError(f"filter_eps: expected None or a number in (0, 1), got "
                             f"{filter_eps!r}")
        if memory_budget is not None and memory_budget > LEAN_BUDGET:
            raise ValueError(f"filter_eps: gradient filtering is a lean-schedule option; "
                             f"memory_budget={memory_budget} selects the budgeted schedule "
                             f"(use memory_budget=None or <= {LEAN_BUDGET})")
    device = hidden.device
    if not (weight.device == device and isinstance(targets, Tensor) and targets.device == device
            and (bias is None or bias.device == device)):
        check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    t = _check_targets(targets, hidden.shape[:-1], V, ignore_index, validate, "hidden")
    if autocast_on():
        hidden, weight, bias = follow_autocast(device, hidden, weight, bias)
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        check_same_dtype(hidden=hidden, weight=weight, bias=bias)
    decision = backends.choose("linear_cross_entropy", backend, device, Facts(hidden.dtype))
    return decision, hidden, weight, bias, t


def _one_pass(memory_budget: Optional[int], backend: str, device: torch.device) -> bool:
    """The budgeted (one-pass) schedule, when gradients are wanted and the reduction is mean or
    sum: asked for with a budget above the lean one, or the CPU default of the torch backend
    (its chunks then hold no more than the lean schedule's, and the logits are computed once)."""
    if memory_budget is not None:
        return memory_budget > LEAN_BUDGET
    return backend == "torch" and device.type == "cpu"


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *,
                         bias: Optional[Tensor] = None, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0, softcap: Optional[float] = None,
                         return_lse: bool = False, validate: bool = False,
                         memory_budget: Optional[int] = None,
                         filter_eps: Optional[float] = None, backend: str = "auto"):
    """Cross-entropy of `hidden @ weight.T (+ bias)` without materializing the logits.

    hidden (..., D), weight (V, D) (typically the tied token embedding: when it is also the
    input embedding, autograd adds both gradients), bias (V,) or None, targets (...).
    Same options and result as `cross_entropy(hidden @ weight.T + bias, targets, ...)`;
    rows whose target is ignore_index give loss 0 and lse 0 and no gradient.
    memory_budget: bytes of working memory the op may use above its inputs and gradients.
      None (the default): the lean schedule, logits recomputed in backward; on a GPU it holds
      at most 32 MiB besides the gradients (on CPU tensors with the "torch" backend: one pass
      with ~20 MiB chunks when gradients are wanted). Above 64 MiB, with reduction mean/sum:
      the budgeted schedule, gradients computed in forward on cuBLAS (fewer FLOPs, more
      memory); `gptfast.LINEAR_CE_BUDGET` (384 MiB) keeps the GPT-2, Llama-3 and Gemma-2
      shapes under half of torch.compile's memory. `gptfast.linear_cross_entropy_memory`
      gives the peak a step will take.
    filter_eps: gradient filtering (lean schedule, kernel backends): a tile of the logits'
      gradient (BLOCK_N rows x BLOCK_V vocabulary entries) whose every entry is below
      filter_eps x its row's upstream gradient is skipped in the back-products, as Cut
      Cross-Entropy does. 2**-12 drops entries under bf16 resolution of a row's O(1) ones;
      the effect on dhidden / dweight is measured in
      tests/test_kernel_cross_entropy.py::test_lean_gradient_filtering (see the README).
      The loss, the lse and the bias gradient are exact; the "torch" backend computes every
      entry. None (the default): off.
    """
    decision, h, w, b, t = _plan_lce(hidden, weight, targets, bias=bias,
                                     ignore_index=ignore_index, reduction=reduction,
                                     label_smoothing=label_smoothing, z_loss=z_loss,
                                     softcap=softcap, validate=validate,
                                     memory_budget=memory_budget, filter_eps=filter_eps,
                                     backend=backend)
    lead = hidden.shape[:-1]
    if h.dim() != 2:
        h = h.reshape(-1, h.shape[-1])
    if h.stride(-1) != 1:
        h = h.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    opts = (ignore_index, float(label_smoothing), float(z_loss),
            float(softcap) if softcap is not None else None)
    wants_grad = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad
                                              or (b is not None and b.requires_grad))
    backend = decision.backend
    if not wants_grad:  # inference: no autograd node, no saved tensors
        if backend == "torch":
            loss_rows, lse = _torch_lce_fwd(h, w, t, b, *opts, memory_budget)
        else:
            loss_rows, lse = kernel(backend, "linear_cross_entropy_fwd", h, w)(h, w, t, b, *opts)
        loss, _ = _reduce(loss_rows, t, ignore_index, reduction)
    elif reduction != "none" and _one_pass(memory_budget, backend, h.device):
        loss, lse = _LinearCrossEntropyBudgeted.apply(h, w, t, b, *opts, reduction,
                                                      memory_budget, backend)
    else:
        loss, lse = _LinearCrossEntropy.apply(h, w, t, b, *opts, reduction, memory_budget,
                                              backend, filter_eps)
    return _shape(loss, lse, lead, reduction, return_lse)


def linear_cross_entropy_memory(N: int, D: int, V: int, *, dtype: torch.dtype,
                                memory_budget: Optional[int] = None, bias: bool = False) -> int:
    """Planned peak bytes of one training step of `linear_cross_entropy` on gptfast's GPU
    kernels, above its inputs, the gradients included.

    N rows (tokens), D hidden, V vocabulary; dtype of hidden and weight; memory_budget as the
    op takes it (None: the lean schedule). Counted: the forward (reduction mean) and the
    backward that follows, with the buffers their launches allocate: the gradients of hidden
    and weight (and bias), per-row vectors (loss, lse, the valid-rows order), the lean
    schedule's fp32 dH chunk (<= 32 MiB) and split statistics, the budgeted schedule's
    accumulators and logits chunk (<= memory_budget). Not counted: cuBLAS/cub workspaces,
    autograd's bookkeeping, an lse gradient under the budgeted schedule. Nothing is allocated
    or computed; the launchers size their buffers from the same plan
    (gptfast/kernels/cross_entropy_plan.py), and a test counts their real allocations at the
    GPT-2, Llama-3 and Gemma-2 shapes against it. Configurations are those of the current GPU,
    or of an H100/H200 when there is none.

        gptfast.linear_cross_entropy_memory(8192, 4096, 128256, dtype=torch.bfloat16)
        # 1151860736 bytes (1098.5 MiB): 1066 MiB of gradients, 32 MiB of fp32 dH rows, ...
    """
    for name, n in (("N", N), ("D", D), ("V", V)):
        if isinstance(n, bool) or not isinstance(n, int) or n < (0 if name == "N" else 1):
            raise ValueError(f"{name}: expected an int >= {0 if name == 'N' else 1}, got {n!r}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype: expected torch.float16, torch.bfloat16 or torch.float32, got "
                         f"{dtype!r}")
    if memory_budget is not None and (isinstance(memory_budget, bool)
                                      or not isinstance(memory_budget, int) or memory_budget < 0):
        raise ValueError(f"memory_budget: expected None or a number of bytes >= 0, got "
                         f"{memory_budget!r}")
    fp32_dw = None
    if torch.cuda.is_available() and dtype != torch.float32:
        fp32_dw = _plan.fp32_dw_supported(torch.device("cuda"), dtype)
    return _plan.plan(N, D, V, dtype, memory_budget, bias=bool(bias), fp32_dw=fp32_dw).peak


backends.register_planner("cross_entropy", lambda *a, **kw: _plan_ce(*a, **kw)[0])
def _explain_lce(hidden, weight, targets, **kw) -> backends.Decision:
    """The decision for `gptfast.explain`, with what the "torch" backend would run (a copy:
    decisions are cached and shared by calls)."""
    decision, h, w, b, t = _plan_lce(hidden, weight, targets, **kw)
    wants_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (h, w, b))
    budget, softcap = kw.get("memory_budget"), kw.get("softcap")
    one_pass = (wants_grad and kw.get("reduction", "mean") != "none"
                and _one_pass(budget, "torch", h.device))
    return dataclasses.replace(decision, torch_path=reference.linear_cross_entropy_torch_path(
        t.numel(), w.shape[0], one_pass=one_pass, memory_budget=budget, softcap=softcap))


backends.register_planner("linear_cross_entropy", _explain_lce)
