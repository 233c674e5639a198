"""float64 oracle for the cross-entropy kernels (plain torch autograd, explicit math).

With `dtype=` other than float64 the same math runs in that dtype end to end (logits, softmax
statistics, loss, autograd): PyTorch's own same-dtype eager computation, the yardstick of the
tolerance rule (tests/_tolerance.py)."""
import torch


def ce_rows_reference(x, targets, *, ignore_index, label_smoothing, z_loss, softcap):
    """(loss_rows, lse) in float64 from float64 logits x (N, V); differentiable in x.

    Ignored rows give loss 0 and lse 0; targets outside [0, V) are not modelled here."""
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    lse = torch.logsumexp(x, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    nll = lse - x.gather(1, safe[:, None])[:, 0]
    loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - x.mean(dim=-1))
    loss = loss + z_loss * lse * lse
    zero = torch.zeros_like(loss)
    return torch.where(valid, loss, zero), torch.where(valid, lse, zero)


def _total(loss, lse, grad_rows, grad_lse, dtype):
    """sum(loss * grad_rows) + sum(lse * grad_lse); grad_rows "zero": only the lse term."""
    if isinstance(grad_rows, str):
        assert grad_rows == "zero" and grad_lse is not None
        total = 0.0
    else:
        total = (loss * (torch.ones_like(loss) if grad_rows is None
                         else grad_rows.to(loss.device, dtype))).sum()
    if grad_lse is not None:
        total = total + (lse * grad_lse.to(lse.device, dtype)).sum()
    return total


def ce_reference(logits, targets, grad_rows=None, grad_lse=None, dtype=torch.float64, **opts):
    """loss_rows, lse, dlogits (in `dtype`) for logits of any dtype. grad_rows None: ones;
    "zero": no loss gradient (only grad_lse)."""
    x = logits.detach().to(dtype).requires_grad_(True)
    loss, lse = ce_rows_reference(x, targets, **opts)
    total = _total(loss, lse, grad_rows, grad_lse, dtype)
    (dx,) = torch.autograd.grad(total, [x])
    return loss.detach(), lse.detach(), dx


def linear_ce_reference(hidden, weight, targets, bias=None, grad_rows=None, grad_lse=None,
                        dtype=torch.float64, **opts):
    """loss_rows, lse, dhidden, dweight, dbias (in `dtype`); logits x = h @ W.T + b explicitly."""
    h = hidden.detach().to(dtype).requires_grad_(True)
    w = weight.detach().to(dtype).requires_grad_(True)
    leaves = [h, w]
    x = h @ w.T
    if bias is not None:
        b = bias.detach().to(dtype).requires_grad_(True)
        leaves.append(b)
        x = x + b
    loss, lse = ce_rows_reference(x, targets, **opts)
    total = _total(loss, lse, grad_rows, grad_lse, dtype)
    grads = torch.autograd.grad(total, leaves)
    db = grads[2] if bias is not None else None
    return loss.detach(), lse.detach(), grads[0], grads[1], db
