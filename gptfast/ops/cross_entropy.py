"""`gptfast.cross_entropy` and `gptfast.linear_cross_entropy`.

Layers, thinnest on top:
  cross_entropy(), linear_cross_entropy()   public functions: checks, autocast, backend choice,
                                            the reduction
  gptfast::cross_entropy_fwd/_bwd/_bwd_,    custom ops (register_fake + register_autograd); the
  gptfast::linear_cross_entropy_fwd/_bwd,   `backend` argument picks the implementation
  gptfast::linear_cross_entropy_fwd_grad
  reference.py / kernels/cross_entropy.py   the implementations

linear_cross_entropy has two schedules (see kernels/cross_entropy.py for their costs):
  lean      (default): forward keeps only the per-row lse; backward recomputes the logits.
  budgeted  (memory_budget > LEAN_BUDGET, reduction mean/sum, gradients wanted): the gradients
            are computed in the forward for a unit upstream gradient, and backward only scales
            them (in place, unless the graph is kept). The "torch" backend on CPU tensors uses
            this one-pass schedule by default (memory_budget=None) with its small chunks: the
            gradients it holds are the ones backward would allocate anyway. An lse gradient (return_lse=True and lse used in the loss) falls back to the
            lean backward for that part.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends, reference
from ._checks import (FLOAT_DTYPES, check_choice, check_range, check_same_device,
                      check_same_dtype, check_tensor, follow_autocast)

REDUCTIONS = ("mean", "sum", "none")
LEAN_BUDGET = 64 << 20  # bytes: the lean schedule's working set, and the default budget
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


# ---- implementations, by backend ------------------------------------------------------------

def _triton():
    from gptfast.kernels import cross_entropy as kern
    return kern


class _TorchImpl:
    """The reference, in the launcher shape of kernels/cross_entropy.py."""

    @staticmethod
    def cross_entropy_forward(logits, targets, **o):
        return reference.cross_entropy(logits, targets, **o)

    @staticmethod
    def cross_entropy_backward(grad_rows, grad_lse, logits, targets, lse, *, inplace=False, **o):
        # Same hand-written gradient as the chunked linear op; no autograd graph is kept.
        x = logits.to(reference._acc_dtype(logits.dtype))
        g = reference._chunk_dlogits(x, targets, lse, grad_rows, grad_lse, **o)
        return g.to(logits.dtype)

    @staticmethod
    def linear_cross_entropy_forward(hidden, weight, targets, bias, *, reduction,
                                     memory_budget=None, **o):
        chunk = reference.chunk_elements(memory_budget, o["softcap"])
        if reduction != "none":  # the fwd_grad op: gradients in the same pass
            return reference.linear_cross_entropy_forward_with_grad(
                hidden, weight, targets, bias, reduction=reduction, chunk_elements=chunk, **o)
        loss_rows, lse = reference.linear_cross_entropy_forward(
            hidden, weight, targets, bias, chunk_elements=chunk, **o)
        return loss_rows, lse, None

    @staticmethod
    def linear_cross_entropy_backward(grad_rows, grad_lse, hidden, weight, targets, bias, lse,
                                      **o):
        return reference.linear_cross_entropy_backward(
            grad_rows, grad_lse, hidden, weight, targets, bias, lse,
            chunk_elements=reference.chunk_elements(None, o["softcap"]), **o)


def _impl(backend: str):
    if backend == "torch":
        return _TorchImpl
    if backend == "triton":
        return _triton()
    raise RuntimeError(f"cross-entropy: no {backend} kernels are registered")  # pragma: no cover


def _triton_support(inputs: dict) -> Optional[str]:
    if inputs["dtype"] not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {inputs['dtype']} is not supported (fp16, bf16, fp32)"
    return None


for _op in ("cross_entropy", "linear_cross_entropy"):
    backends.register_support(_op, "triton", _triton_support)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Dtype of losses and lse: fp32, or fp64 for fp64 inputs (the "torch" backend)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _opts(ignore_index, label_smoothing, z_loss, softcap):
    return dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                softcap=softcap)


# ---- custom ops: cross-entropy over given logits ----------------------------------------------

@torch.library.custom_op("gptfast::cross_entropy_fwd", mutates_args=())
def _ce_fwd(logits: Tensor, targets: Tensor, ignore_index: int, label_smoothing: float,
            z_loss: float, softcap: Optional[float], inplace_backward: bool,
            backend: str) -> tuple[Tensor, Tensor]:
    # `inplace_backward` only matters to the backward; it is an input so autograd can save it.
    loss_rows, lse = _impl(backend).cross_entropy_forward(
        logits, targets, **_opts(ignore_index, label_smoothing, z_loss, softcap))
    acc = _acc(logits.dtype)
    return loss_rows.to(acc).contiguous(), lse.to(acc).contiguous()


@_ce_fwd.register_fake
def _(logits, targets, ignore_index, label_smoothing, z_loss, softcap, inplace_backward, backend):
    n, acc = logits.shape[0], _acc(logits.dtype)
    return logits.new_empty(n, dtype=acc), logits.new_empty(n, dtype=acc)


@torch.library.custom_op("gptfast::cross_entropy_bwd", mutates_args=())
def _ce_bwd(grad_rows: Optional[Tensor], grad_lse: Optional[Tensor], logits: Tensor,
            targets: Tensor, lse: Tensor, ignore_index: int, label_smoothing: float,
            z_loss: float, softcap: Optional[float], backend: str) -> Tensor:
    return _impl(backend).cross_entropy_backward(
        grad_rows, grad_lse, logits, targets, lse,
        **_opts(ignore_index, label_smoothing, z_loss, softcap)).contiguous()


@_ce_bwd.register_fake
def _(grad_rows, grad_lse, logits, targets, lse, ignore_index, label_smoothing, z_loss, softcap,
      backend):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("gptfast::cross_entropy_bwd_", mutates_args=("logits",))
def _ce_bwd_inplace(grad_rows: Optional[Tensor], grad_lse: Optional[Tensor], logits: Tensor,
                    targets: Tensor, lse: Tensor, ignore_index: int, label_smoothing: float,
                    z_loss: float, softcap: Optional[float], backend: str) -> None:
    """The backward that overwrites the logits with their gradient (no second N x V buffer)."""
    dlogits = _impl(backend).cross_entropy_backward(
        grad_rows, grad_lse, logits, targets, lse, inplace=True,
        **_opts(ignore_index, label_smoothing, z_loss, softcap))
    if dlogits.data_ptr() != logits.data_ptr():  # a backend that cannot write in place
        logits.copy_(dlogits)


def _ce_setup(ctx, inputs, output):
    logits, targets, *args, inplace_backward, backend = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, targets, output[1])
    ctx.args = (*args, backend)
    ctx.inplace_backward = inplace_backward


def _ce_backward(ctx, grad_rows, grad_lse):
    logits, targets, lse = ctx.saved_tensors
    if ctx.inplace_backward:
        _ce_bwd_inplace(grad_rows, grad_lse, logits, targets, lse, *ctx.args)
        dlogits = logits
    else:
        dlogits = _ce_bwd(grad_rows, grad_lse, logits, targets, lse, *ctx.args)
    return dlogits, None, None, None, None, None, None, None


_ce_fwd.register_autograd(_ce_backward, setup_context=_ce_setup)


# ---- custom ops: linear cross-entropy --------------------------------------------------------

@torch.library.custom_op("gptfast::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor],
             ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float],
             backend: str) -> tuple[Tensor, Tensor]:
    loss_rows, lse, _ = _impl(backend).linear_cross_entropy_forward(
        hidden, weight, targets, bias, reduction="none",
        **_opts(ignore_index, label_smoothing, z_loss, softcap))
    acc = _acc(hidden.dtype)
    return loss_rows.to(acc).contiguous(), lse.to(acc).contiguous()


@_lce_fwd.register_fake
def _(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, softcap, backend):
    n, acc = hidden.shape[0], _acc(hidden.dtype)
    return hidden.new_empty(n, dtype=acc), hidden.new_empty(n, dtype=acc)


@torch.library.custom_op("gptfast::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd(grad_rows: Optional[Tensor], grad_lse: Optional[Tensor], hidden: Tensor,
             weight: Tensor, targets: Tensor, bias: Optional[Tensor], lse: Tensor,
             ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float],
             backend: str) -> tuple[Tensor, Tensor, Tensor]:
    dh, dw, db = _impl(backend).linear_cross_entropy_backward(
        grad_rows, grad_lse, hidden, weight, targets, bias, lse,
        **_opts(ignore_index, label_smoothing, z_loss, softcap))
    db = db.contiguous() if db is not None else hidden.new_empty(0)  # ops cannot return None
    return dh.contiguous(), dw.contiguous(), db


@_lce_bwd.register_fake
def _(grad_rows, grad_lse, hidden, weight, targets, bias, lse, ignore_index, label_smoothing,
      z_loss, softcap, backend):
    db = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0)
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), db


def _lce_setup(ctx, inputs, output):
    hidden, weight, targets, bias, *args = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, targets, bias, output[1])
    ctx.args = args


def _lce_backward(ctx, grad_rows, grad_lse):
    hidden, weight, targets, bias, lse = ctx.saved_tensors
    dh, dw, db = _lce_bwd(grad_rows, grad_lse, hidden, weight, targets, bias, lse, *ctx.args)
    return dh, dw, None, (db if bias is not None else None), None, None, None, None, None


_lce_fwd.register_autograd(_lce_backward, setup_context=_lce_setup)


@torch.library.custom_op("gptfast::linear_cross_entropy_fwd_grad", mutates_args=())
def _lce_fwd_grad(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor],
                  ignore_index: int, label_smoothing: float, z_loss: float,
                  softcap: Optional[float], reduction: str, memory_budget: int,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Budgeted schedule: (reduced loss, lse, dhidden, dweight, dbias) for a unit upstream
    gradient of the reduced loss. The last three are saved for backward, never used directly."""
    loss_rows, lse, grads = _impl(backend).linear_cross_entropy_forward(
        hidden, weight, targets, bias, reduction=reduction, memory_budget=memory_budget,
        **_opts(ignore_index, label_smoothing, z_loss, softcap))
    dh, dw, db = grads
    acc = _acc(hidden.dtype)
    loss = reference.reduce_rows(loss_rows.to(acc), targets, ignore_index, reduction)
    db = db.contiguous() if db is not None else hidden.new_empty(0)
    return loss, lse.to(acc).contiguous(), dh.contiguous(), dw.contiguous(), db


@_lce_fwd_grad.register_fake
def _(hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, softcap, reduction,
      memory_budget, backend):
    n, acc = hidden.shape[0], _acc(hidden.dtype)
    db = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0)
    return (hidden.new_empty((), dtype=acc), hidden.new_empty(n, dtype=acc),
            hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), db)


def _lce_grad_setup(ctx, inputs, output):
    hidden, weight, targets, bias, ignore_index, label_smoothing, z_loss, softcap, *_, backend \
        = inputs
    _, lse, dh, dw, db = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(dh, dw, db)
    ctx.save_for_backward(hidden, weight, targets, bias, lse, dh, dw, db)
    ctx.args = (ignore_index, label_smoothing, z_loss, softcap, backend)


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


def _lce_grad_backward(ctx, grad_loss, grad_lse, *_):
    hidden, weight, targets, bias, lse, dh, dw, db = ctx.saved_tensors
    if grad_loss is None:
        dh, dw, db = torch.zeros_like(dh), torch.zeros_like(dw), torch.zeros_like(db)
    elif _graph_is_freed_after_this_backward(dw):
        # The saved gradients are used this once: scale them in place (no second buffer the
        # size of the weight's gradient).
        dh, dw, db = dh.mul_(grad_loss), dw.mul_(grad_loss), db.mul_(grad_loss)
    else:
        dh, dw, db = dh * grad_loss, dw * grad_loss, db * grad_loss
    if grad_lse is not None:  # rare: the lse itself is in the loss; recompute that part
        eh, ew, eb = _lce_bwd(None, grad_lse, hidden, weight, targets, bias, lse, *ctx.args)
        dh, dw, db = dh + eh, dw + ew, db + eb
    return (dh, dw, None, (db if bias is not None else None),
            None, None, None, None, None, None, None)


_lce_fwd_grad.register_autograd(_lce_grad_backward, setup_context=_lce_grad_setup)


# ---- public functions ------------------------------------------------------------------------

def _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap):
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
    check_tensor("targets", targets, dtypes=INT_DTYPES)
    if tuple(targets.shape) != tuple(lead_shape):
        raise ValueError(f"targets: expected shape {tuple(lead_shape)} (the leading dims of "
                         f"{arg}), got {tuple(targets.shape)}")
    targets = targets.reshape(-1).long()
    # On the CPU the check is free; on a GPU it would cost a host sync, so there it runs only
    # with validate=True (otherwise those rows give a NaN loss). Never inside torch.compile.
    if (validate or targets.device.type == "cpu") and not torch.compiler.is_compiling():
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
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits: expected shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    device = check_same_device(logits=logits, targets=targets)
    _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    t = _check_targets(targets, logits.shape[:-1], logits.shape[-1], ignore_index, validate,
                       "logits")
    (logits,) = follow_autocast(device, logits)
    decision = backends.choose("cross_entropy", backend, device, dict(dtype=logits.dtype))
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
    x = x.reshape(-1, x.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    sc = float(softcap) if softcap is not None else None
    if decision.backend == "torch":
        loss_rows, lse = reference.cross_entropy(
            x, t, **_opts(ignore_index, float(label_smoothing), float(z_loss), sc))
    else:
        loss_rows, lse = _ce_fwd(x, t, ignore_index, float(label_smoothing), float(z_loss), sc,
                                 bool(inplace_backward), decision.backend)
    return _finish(loss_rows, lse, t, lead, ignore_index, reduction, return_lse)


def _plan_lce(hidden, weight, targets, *, bias=None, ignore_index=-100, reduction="mean",
              label_smoothing=0.0, z_loss=0.0, softcap=None, return_lse=False, validate=False,
              memory_budget=None, backend="auto"):
    check_tensor("hidden", hidden, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, what="(V, D)")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden: expected shape (..., {weight.shape[1]}) to match weight "
                         f"(V, D) = {tuple(weight.shape)}, got {tuple(hidden.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, what="(V,)")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape)}")
    if memory_budget is not None and (not isinstance(memory_budget, int) or memory_budget < 0):
        raise ValueError(f"memory_budget: expected None or a number of bytes >= 0, got "
                         f"{memory_budget!r}")
    device = check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    _check_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    t = _check_targets(targets, hidden.shape[:-1], weight.shape[0], ignore_index, validate,
                       "hidden")
    hidden, weight, bias = follow_autocast(device, hidden, weight, bias)
    check_same_dtype(hidden=hidden, weight=weight, bias=bias)
    decision = backends.choose("linear_cross_entropy", backend, device,
                               dict(dtype=hidden.dtype))
    wants_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (hidden, weight, bias))
    decision.torch_path = reference.linear_cross_entropy_torch_path(
        t.numel(), weight.shape[0], memory_budget=memory_budget, softcap=softcap,
        one_pass=(wants_grad and reduction != "none"
                  and (memory_budget > LEAN_BUDGET if memory_budget is not None
                       else device.type == "cpu")))
    return decision, hidden, weight, bias, t


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *,
                         bias: Optional[Tensor] = None, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0,
                         z_loss: float = 0.0, softcap: Optional[float] = None,
                         return_lse: bool = False, validate: bool = False,
                         memory_budget: Optional[int] = None, backend: str = "auto"):
    """Cross-entropy of `hidden @ weight.T (+ bias)` without materializing the logits.

    hidden (..., D), weight (V, D) (typically the tied token embedding: when it is also the
    input embedding, autograd adds both gradients), bias (V,) or None, targets (...).
    Same options and result as `cross_entropy(hidden @ weight.T + bias, targets, ...)`.
    Memory above the inputs and their gradients is O(chunk x V), never O(N x V).
    memory_budget: bytes of working memory the op may use. None (the default, about 64 MiB):
    the lean schedule, logits recomputed in backward (on CPU tensors with the "torch" backend:
    one pass with ~20 MiB chunks when gradients are wanted). Larger, with reduction mean/sum:
    the budgeted schedule, gradients computed in forward (fewer FLOPs, more memory).
    """
    decision, h, w, b, t = _plan_lce(hidden, weight, targets, bias=bias,
                                     ignore_index=ignore_index, reduction=reduction,
                                     label_smoothing=label_smoothing, z_loss=z_loss,
                                     softcap=softcap, validate=validate,
                                     memory_budget=memory_budget, backend=backend)
    lead = hidden.shape[:-1]
    h = h.reshape(-1, h.shape[-1])
    if h.stride(-1) != 1:
        h = h.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    opts = (ignore_index, float(label_smoothing), float(z_loss),
            float(softcap) if softcap is not None else None)
    wants_grad = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad
                                              or (b is not None and b.requires_grad))
    budgeted = (memory_budget is not None and memory_budget > LEAN_BUDGET
                and reduction != "none" and wants_grad)
    # On the CPU the torch backend computes the gradients in the forward by default: its
    # chunks then hold no more than the lean schedule's, and the logits are computed once.
    cpu_one_pass = (memory_budget is None and decision.backend == "torch"
                    and h.device.type == "cpu" and reduction != "none" and wants_grad)
    if cpu_one_pass:
        memory_budget = reference.DEFAULT_WORKSPACE
    if budgeted or cpu_one_pass:
        loss, lse, *_ = _lce_fwd_grad(h, w, t, b, *opts, reduction, memory_budget,
                                      decision.backend)
        return (loss, lse.view(lead)) if return_lse else loss
    loss_rows, lse = _lce_fwd(h, w, t, b, *opts, decision.backend)
    return _finish(loss_rows, lse, t, lead, ignore_index, reduction, return_lse)


backends.register_planner("cross_entropy", lambda *a, **kw: _plan_ce(*a, **kw)[0])
backends.register_planner("linear_cross_entropy", lambda *a, **kw: _plan_lce(*a, **kw)[0])
