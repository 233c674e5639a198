"""float64 oracle for the cross-entropy kernels (plain torch autograd, explicit math)."""
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


def ce_reference(logits, targets, grad_rows=None, grad_lse=None, **opts):
    """loss_rows, lse, dlogits (float64) for logits of any dtype."""
    x = logits.detach().to(torch.float64).requires_grad_(True)
    loss, lse = ce_rows_reference(x, targets, **opts)
    if grad_rows is None:
        grad_rows = torch.ones_like(loss)
    total = (loss * grad_rows.to(torch.float64)).sum()
    if grad_lse is not None:
        total = total + (lse * grad_lse.to(torch.float64)).sum()
    (dx,) = torch.autograd.grad(total, [x])
    return loss.detach(), lse.detach(), dx


def linear_ce_reference(hidden, weight, targets, bias=None, grad_rows=None, grad_lse=None,
                        **opts):
    """loss_rows, lse, dhidden, dweight, dbias (float64); logits x = h @ W.T + b explicitly."""
    h = hidden.detach().to(torch.float64).requires_grad_(True)
    w = weight.detach().to(torch.float64).requires_grad_(True)
    leaves = [h, w]
    x = h @ w.T
    if bias is not None:
        b = bias.detach().to(torch.float64).requires_grad_(True)
        leaves.append(b)
        x = x + b
    loss, lse = ce_rows_reference(x, targets, **opts)
    if grad_rows is None:
        grad_rows = torch.ones_like(loss)
    total = (loss * grad_rows.to(torch.float64)).sum()
    if grad_lse is not None:
        total = total + (lse * grad_lse.to(torch.float64)).sum()
    grads = torch.autograd.grad(total, leaves)
    db = grads[2] if bias is not None else None
    return loss.detach(), lse.detach(), grads[0], grads[1], db
