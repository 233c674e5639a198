"""Float64 oracles written from the definitions, independent of gptfast/ops/reference.py."""
import math

import torch


def attention_oracle(q, k, v, *, causal=True, softmax_scale=None, alibi_slopes=None, window=None,
                     key_padding_mask=None, keep_mask=None, dropout_p=0.0, softcap=None):
    """Row by row in float64: returns (out, lse) with lse=-inf and out=0 for empty rows."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Sq, d = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(d)
    off = Sk - Sq
    out = torch.zeros(B, Hq, Sq, d, dtype=torch.float64)
    lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float64)
    j = torch.arange(Sk)
    for b in range(B):
        for h in range(Hq):
            kv = h // (Hq // Hkv)
            s_all = (q[b, h].cpu() @ k[b, kv].cpu().T) * scale  # (Sq, Sk)
            if softcap is not None:
                s_all = softcap * torch.tanh(s_all / softcap)
            for i in range(Sq):
                vis = torch.ones(Sk, dtype=torch.bool)
                if causal:
                    vis &= j <= i + off
                if window is not None:
                    vis &= j > i + off - window
                if key_padding_mask is not None:
                    vis &= key_padding_mask[b].cpu()
                if not vis.any():
                    continue
                s = s_all[i].clone()
                if alibi_slopes is not None:
                    s -= float(alibi_slopes[h]) * (i + off - j).abs().double()
                s = s[vis]
                m = s.max()
                lse[b, h, i] = m + torch.log(torch.exp(s - m).sum())
                p = torch.exp(s - lse[b, h, i])
                if keep_mask is not None:
                    p = p * keep_mask[b, h, i].cpu()[vis] / (1 - dropout_p)
                out[b, h, i] = p @ v[b, kv].cpu()[vis]
    return out, lse


def cross_entropy_oracle(x, targets, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                         z_loss=0.0, softcap=None):
    """Loss of float64 logits x (N, V) built from torch.log_softmax; differentiable. Rows whose
    target is ignore_index: loss 0 and lse 0, no gradient (gptfast's contract)."""
    x = x.double()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    V = x.shape[-1]
    logp = torch.log_softmax(x, -1)
    lse = torch.logsumexp(x, -1)
    valid = targets != ignore_index
    t = torch.where(valid, targets, 0)
    nll = -logp.gather(-1, t[:, None])[:, 0]
    smooth = -logp.sum(-1) / V
    rows = (1 - label_smoothing) * nll + label_smoothing * smooth + z_loss * lse ** 2
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    lse = torch.where(valid, lse, torch.zeros_like(lse))
    if reduction == "none":
        return rows, lse
    if reduction == "sum":
        return rows.sum(), lse
    return rows.sum() / valid.sum(), lse
