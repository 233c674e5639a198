"""GPT-2 124M training step: the gptfast model (fused attention + fused linear cross-entropy)
against the same architecture on PyTorch SDPA with full fp32 logits for the loss, each eager
and under `torch.compile(fullgraph=True)`.

Batch 16 x 1024 tokens, bf16 autocast, fused AdamW, dropout off (as in speed runs). A step is
forward + backward + optimizer step + zero_grad. Reported: ms/step, tokens/s,
MFU = tokens/s x (6·N + 12·L·d·T) / peak, with N the parameters without the position
embedding, L layers, d the width, T the context, and peak = 989 TFLOP/s (dense bf16, H100/H200;
other GPUs: gptfast.train.PEAK_BF16_FLOPS), and the peak memory allocated during a step (model,
gradients, optimizer state and activations).

    python benchmarks/bench_train.py [--quick] [--tiny] [--out DIR]

The baseline model is written here (nanoGPT style) because gptfast.model has no switch for its
attention and loss. The CPU run: the tiny preset, float32, eager only.
"""
from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

GPTFAST, BASELINE = "gptfast", "sdpa-full-logits"


# ---- the baseline: same architecture, SDPA attention, loss on materialized logits ---------------

class _Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_head = c.n_head
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_eps, bias=c.bias)
        self.attn = _Attention(c)
        self.ln_2 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_eps, bias=c.bias)
        self.c_fc = nn.Linear(c.n_embd, c.n_inner, bias=c.bias)
        self.mlp_proj = nn.Linear(c.n_inner, c.n_embd, bias=c.bias)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class BaselineGPT(nn.Module):
    """Pre-LN GPT-2 with learned positions and tied embeddings; SDPA; fp32 logits for the loss."""

    def __init__(self, c):
        super().__init__()
        self.config = c
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.h = nn.ModuleList([_Block(c) for _ in range(c.n_layer)])
        self.ln_f = nn.LayerNorm(c.n_embd, eps=c.layer_norm_eps, bias=c.bias)
        residual = {m for b in self.h for m in (b.attn.c_proj, b.mlp_proj)}
        for m in self.modules():   # GPT-2 init: random, never zeros (zeros make kernels lie)
            if isinstance(m, (nn.Linear, nn.Embedding)):
                scale = math.sqrt(2 * c.n_layer) if m in residual else 1.0
                nn.init.normal_(m.weight, std=0.02 / scale)

    def num_params(self, exclude_positions=False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if exclude_positions else n

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)                   # (B, T, V)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
        return logits, loss


# ---- configuration -------------------------------------------------------------------------------

def setup(run: harness.Run) -> dict:
    from gptfast.model import get_config
    if run.is_cuda:
        # quick: GPT-2 width, 2 of its 12 layers and half the batch, so four models compile in
        # the gpu-check budget; the full run is the 124M model.
        layers, batch = (2, 8) if run.quick else (12, 16)
        cfg = get_config("gpt2", n_layer=layers, dropout=0.0, attn_dropout=0.0)
        return dict(preset="gpt2" if layers == 12 else f"gpt2 width, {layers} of 12 layers",
                    config=cfg, batch=batch, dtype="bf16 autocast", compile=True)
    cfg = get_config("tiny", dropout=0.0, attn_dropout=0.0)
    if run.tiny:
        cfg = get_config("tiny", dropout=0.0, attn_dropout=0.0, block_size=32, n_layer=1)
    return dict(preset="tiny", config=cfg, batch=2 if run.tiny else 8, dtype="fp32",
                compile=False)


def make_model(kind: str, cfg, device):
    from gptfast.model import GPT
    torch.manual_seed(0)
    model = GPT(cfg) if kind == GPTFAST else BaselineGPT(cfg)
    return model.to(device).train()


def measure(run: harness.Run, kind: str, compiled: bool, s: dict) -> dict:
    from gptfast.train import flops_per_token, peak_flops
    cfg, B, T = s["config"], s["batch"], s["config"].block_size
    name = f"{kind} {'compiled' if compiled else 'eager'}"
    row = dict(peer=name, model=kind, compiled=compiled, n_layer=cfg.n_layer, batch=B, T=T,
               ms=None, tokens_per_s=None, mfu=None, peak_mem_bytes=None, loss=None, error=None)
    model = opt = None
    try:
        model = make_model(kind, cfg, run.device)
        row["params"] = model.num_params()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                                fused=run.is_cuda)
        fwd = torch.compile(model, fullgraph=True) if compiled else model
        gen = torch.Generator(device=run.device).manual_seed(1)
        x = torch.randint(0, cfg.vocab_size, (B, T), device=run.device, generator=gen)
        y = torch.randint(0, cfg.vocab_size, (B, T), device=run.device, generator=gen)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if run.is_cuda
                    else contextlib.nullcontext())
        losses = []

        def step():
            with autocast:
                _, loss = fwd(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())

        for _ in range(2):        # compile, optimizer state, allocator warm-up
            step()
        row["ms"] = run.time_ms(step)
        row["peak_mem_bytes"] = run.peak_bytes(step)
        if run.is_cuda:  # the whole step's peak, not the part above the model
            row["peak_mem_bytes"] = torch.cuda.max_memory_allocated(run.device)
        row["loss"] = float(losses[-1])
        row["tokens_per_s"] = B * T / (row["ms"] * 1e-3)
        fpt = flops_per_token(model.num_params(exclude_positions=True), cfg.n_layer,
                              cfg.n_embd, T)
        peak = peak_flops(torch.cuda.get_device_name(run.device)) if run.is_cuda else None
        row["flops_per_token"] = fpt
        row["mfu"] = None if peak is None else fpt * row["tokens_per_s"] / peak
    except Exception as e:  # noqa: BLE001 - a failing peer is a row with its error
        row["error"] = "out of memory" if harness.is_oom(e) else harness.error_text(e)
    finally:
        del model, opt
        run.empty_cache()
    return row


# ---- goals (pure: unit-tested on synthetic rows) -------------------------------------------------

def _get(rows, peer, key):
    for r in rows:
        if r["peer"] == peer:
            return r.get(key)
    return None


def train_goals(rows: List[dict], judged: bool = True) -> List[dict]:
    ours, base = f"{GPTFAST} compiled", f"{BASELINE} compiled"
    return [
        harness.goal("train compiled tokens/s vs compiled SDPA baseline",
                     harness.ratio(_get(rows, ours, "tokens_per_s"),
                                   _get(rows, base, "tokens_per_s")), 1.25, judged=judged),
        harness.goal("train compiled peak memory / compiled SDPA baseline",
                     harness.ratio(_get(rows, ours, "peak_mem_bytes"),
                                   _get(rows, base, "peak_mem_bytes")), 1.0, direction="<",
                     judged=judged),
    ]


# ---- output -------------------------------------------------------------------------------------

def table(rows: List[dict]) -> str:
    body = [[r["peer"], r["n_layer"], f"{r['batch']}x{r['T']}", r["ms"],
             None if r["tokens_per_s"] is None else r["tokens_per_s"] / 1e3,
             None if r["mfu"] is None else 100 * r["mfu"],
             None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / harness.GiB,
             r["loss"], r["error"] or ""] for r in rows]
    return harness.md_table(["model", "layers", "batch", "ms/step", "k tokens/s", "MFU %",
                             "peak GiB", "loss", "error"], body)


def plot(rows: List[dict], title: str):
    def make(out_dir: Path) -> List[Path]:
        import matplotlib.pyplot as plt
        ok = [r for r in rows if r["ms"] is not None]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        names = [r["peer"] for r in ok]
        axes[0].bar(names, [r["tokens_per_s"] / 1e3 for r in ok])
        axes[0].set_ylabel("k tokens / s")
        axes[1].bar(names, [(r["peak_mem_bytes"] or 0) / harness.GiB for r in ok])
        axes[1].set_ylabel("peak memory (GiB)")
        for ax in axes:
            ax.tick_params(axis="x", rotation=20, labelsize=8)
            ax.grid(alpha=0.3, axis="y")
        return harness.save_figure(fig, out_dir / "train_step.png", title)
    return make


def main(argv=None) -> int:
    run = harness.start("train", argv)
    s = setup(run)
    c = s["config"]
    run.config = {"model": f"{s['preset']}: n_layer={c.n_layer}, n_embd={c.n_embd}, "
                           f"T={c.block_size}, V={c.vocab_size}", "batch": s["batch"],
                  "dtype": s["dtype"], "optimizer": "AdamW (fused on CUDA)",
                  "mfu": "tokens/s * (6*N + 12*L*d*T) / peak bf16 (989 TFLOP/s on H100/H200)"}
    modes = [False, True] if s["compile"] else [False]
    if not s["compile"]:
        for kind in (GPTFAST, BASELINE):
            run.missing(f"{kind} compiled", "torch.compile is not run on the CPU (compile time)")
    for compiled in modes:
        for kind in (GPTFAST, BASELINE):
            row = run.add_row(**measure(run, kind, compiled, s))
            print(f"  {row['peer']:28s} "
                  + ("–" if row["ms"] is None else
                     f"{row['ms']:.3g} ms/step {row['tokens_per_s'] / 1e3:.4g} k tok/s")
                  + f" {row['error'] or ''}", flush=True)
            if row["error"]:
                run.missing(row["peer"], row["error"])
    run.goals = train_goals(run.rows, judged=run.is_cuda)
    run.finish(table(run.rows), plot(run.rows, f"training step, {run.slug}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
