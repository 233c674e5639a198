"""Causal attention: gptfast against PyTorch SDPA (flash, cuDNN, mem-efficient, math),
FlexAttention (compiled, causal block mask) and eager attention.

Shapes: bf16, hidden 2048 (H = 2048 / d), 16k tokens per batch (B = 16384 / S), S = 1k ... 16k,
d = 64 and 128. FLOPs: forward 4·B·H·S²·d / 2 (causal), backward 2.5 × forward.
Forward is timed with inputs that require grad (the training forward, which keeps the lse);
backward is `out.backward(dout)` on a kept graph. Memory: peak above the inputs during one
forward + backward. Also gptfast with deterministic=True (backward only).

    python benchmarks/bench_attention.py [--quick] [--tiny] [--out DIR]

On the CPU: gptfast's "auto" (the torch reference) against SDPA math / CPU flash and eager at
small sizes, float32.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

GPTFAST, DETERMINISTIC = "gptfast", "gptfast-deterministic"
# The CUDA C++ kernels (csrc/attention/) by name: "auto" does not pick them until these rows show
# them faster (gptfast.ops.attention.CUDA_AUTO).
CUDA, CUDA_DETERMINISTIC = "gptfast-cuda", "gptfast-cuda-deterministic"
FORWARD_ONLY_ONCE = (DETERMINISTIC, CUDA_DETERMINISTIC)  # same forward as their peer
SDPA = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
        "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}
FLEX, EAGER = "flex-compiled", "eager"
# Materializing peers (S x S scores per head) only up to this length: beyond, they need tens of
# GiB and minutes, and prove nothing new.
MATERIALIZED_MAX_S = 4096


def shapes(run: harness.Run) -> dict:
    if run.is_cuda:
        return dict(hidden=2048, tokens=16384, dtype=torch.bfloat16,
                    S=[1024, 4096] if run.quick else [1024, 2048, 4096, 8192, 16384],
                    d=[128, 64])
    if run.tiny:
        return dict(hidden=64, tokens=128, dtype=torch.float32, S=[32, 64], d=[32])
    return dict(hidden=256, tokens=1024, dtype=torch.float32, S=[128, 256], d=[64])


def fwd_flops(B: int, H: int, S: int, d: int) -> float:
    return 4.0 * B * H * S * S * d / 2


# ---- the peers: each maps (q, k, v) to the output ----------------------------------------------

def eager_attention(q, k, v):
    S = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    mask = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def sdpa_peer(backend_name: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name)

    def fn(q, k, v):
        with sdpa_kernel(backend):  # only this backend may run (no silent fallback)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return fn


def flex_peer(S: int, device) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, B=None, H=None, Q_LEN=S,
                                   KV_LEN=S, device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def gptfast_peer(deterministic: bool = False, backend: str = "auto") -> Callable:
    import gptfast
    return lambda q, k, v: gptfast.attention(q, k, v, causal=True, deterministic=deterministic,
                                             backend=backend)


def peers_for(run: harness.Run, S: int, d: int, first_d: bool) -> Dict[str, Optional[Callable]]:
    """name -> function, or None (skipped at this point, reason recorded)."""
    peers: Dict[str, Optional[Callable]] = {GPTFAST: gptfast_peer(),
                                            DETERMINISTIC: gptfast_peer(True)}
    if not run.is_cuda:
        run.missing(CUDA, "the CUDA C++ kernels need a GPU (CPU run)")
    else:
        from gptfast.ops import backends
        if backends.cuda_extension() is None:
            run.missing(CUDA, "gptfast._C is not built (make build-cuda)")
        else:
            peers[CUDA] = gptfast_peer(backend="cuda")
            if not run.quick:  # gpu-check's quick run keeps to its time slot
                peers[CUDA_DETERMINISTIC] = gptfast_peer(True, backend="cuda")
    for name, backend in SDPA.items():
        if not run.is_cuda and name in ("sdpa-cudnn", "sdpa-efficient"):
            run.missing(name, "needs CUDA (CPU run)")
            continue
        if name == "sdpa-math" and S > MATERIALIZED_MAX_S:
            run.skip(name, f"S={S} d={d}", f"materializes S x S scores; run up to S={MATERIALIZED_MAX_S}")
            peers[name] = None
            continue
        peers[name] = sdpa_peer(backend)
    if not run.is_cuda:
        run.missing(FLEX, "compiled FlexAttention is a GPU peer (CPU run)")
    elif run.quick and not first_d:
        run.skip(FLEX, f"S={S} d={d}", "quick mode compiles FlexAttention for the first d only")
        peers[FLEX] = None
    else:
        peers[FLEX] = flex_peer(S, run.device)
    if S > MATERIALIZED_MAX_S:
        run.skip(EAGER, f"S={S} d={d}", f"materializes S x S scores; run up to S={MATERIALIZED_MAX_S}")
        peers[EAGER] = None
    else:
        peers[EAGER] = eager_attention
    return peers


# ---- measuring one point ---------------------------------------------------------------------

def measure(run: harness.Run, name: str, fn: Callable, B: int, H: int, S: int, d: int,
            dtype) -> dict:
    row = dict(peer=name, d=d, S=S, B=B, H=H, fwd_ms=None, bwd_ms=None, fwd_tflops=None,
               bwd_tflops=None, peak_mem_bytes=None, error=None)
    gen = torch.Generator(device=run.device).manual_seed(S * 1000 + d)
    q, k, v = (torch.randn(B, H, S, d, device=run.device, dtype=dtype, generator=gen)
               .requires_grad_() for _ in range(3))
    dout = torch.randn(B, H, S, d, device=run.device, dtype=dtype, generator=gen)
    flops = fwd_flops(B, H, S, d)
    try:
        if name == GPTFAST:
            import gptfast
            row["backend"] = gptfast.explain(gptfast.attention, q, k, v, causal=True).backend
        out = fn(q, k, v)                      # first call: compiles, checks the peer runs
        if name not in FORWARD_ONLY_ONCE:      # same forward as its peer: time only its backward
            row["fwd_ms"] = run.time_ms(lambda: fn(q, k, v))
            row["fwd_tflops"] = flops / (row["fwd_ms"] * 1e-3) / 1e12
        row["bwd_ms"] = run.time_ms(lambda: out.backward(dout, retain_graph=True),
                                    grad_to_none=[q, k, v])
        row["bwd_tflops"] = 2.5 * flops / (row["bwd_ms"] * 1e-3) / 1e12
        del out
        q.grad = k.grad = v.grad = None

        def clear_grads():
            q.grad = k.grad = v.grad = None

        def step():
            clear_grads()
            fn(q, k, v).backward(dout)
        row["peak_mem_bytes"] = run.peak_bytes(step, setup=clear_grads)  # grads counted
    except Exception as e:  # noqa: BLE001 - a failing peer is a row with its error
        row["error"] = "out of memory" if harness.is_oom(e) else harness.error_text(e)
    finally:
        q.grad = k.grad = v.grad = None
        run.empty_cache()
    return row


# ---- goals (pure: unit-tested on synthetic rows) -------------------------------------------------

def _value(rows: List[dict], peer: str, d: int, S: int, key: str) -> Optional[float]:
    for r in rows:
        if r["peer"] == peer and r["d"] == d and r["S"] == S:
            return r.get(key)
    return None


def attention_goals(rows: List[dict], judged: bool = True) -> List[dict]:
    """The attention issue's goals, per head dim, each judged at its worst sequence length."""
    goals = []
    for d in sorted({r["d"] for r in rows}, reverse=True):
        seqs = sorted({r["S"] for r in rows if r["d"] == d})

        def ratios(num_peer, den_peer, key, pick=lambda S: True):
            pts = {S: harness.ratio(_value(rows, num_peer, d, S, key),
                                    _value(rows, den_peer, d, S, key))
                   for S in seqs if pick(S)}
            detail = ", ".join(f"S={S}: " + ("–" if r is None else f"{r:.2f}")
                               for S, r in pts.items())
            return (harness.worst(pts.values()) if pts else None), detail

        spec = [
            (f"attn fwd vs SDPA flash, S>=2k, d={d}", GPTFAST, "sdpa-flash", "fwd_tflops",
             lambda S: S >= 2048, 1.2, False),
            (f"attn fwd vs SDPA flash, S<2k, d={d}", GPTFAST, "sdpa-flash", "fwd_tflops",
             lambda S: S < 2048, 1.0, False),
            (f"attn bwd vs SDPA flash, d={d}", GPTFAST, "sdpa-flash", "bwd_tflops",
             lambda S: True, 1.1, False),
            (f"attn deterministic bwd vs SDPA flash, d={d}", DETERMINISTIC, "sdpa-flash",
             "bwd_tflops", lambda S: True, 0.9, False),
            # issue 13: the mma.sync CUDA C++ kernels at least match FA2 for S >= 2k
            (f"attn CUDA C++ fwd vs SDPA flash, S>=2k, d={d}", CUDA, "sdpa-flash", "fwd_tflops",
             lambda S: S >= 2048, 1.0, False),
            (f"attn CUDA C++ bwd vs SDPA flash, S>=2k, d={d}", CUDA, "sdpa-flash", "bwd_tflops",
             lambda S: S >= 2048, 1.0, False),
            (f"attn fwd vs SDPA cuDNN, d={d}", GPTFAST, "sdpa-cudnn", "fwd_tflops",
             lambda S: True, 1.0, True),
            (f"attn bwd vs SDPA cuDNN, d={d}", GPTFAST, "sdpa-cudnn", "bwd_tflops",
             lambda S: True, 1.0, True),
        ]
        for name, num, den, key, pick, target, stretch in spec:
            if not any(pick(S) for S in seqs):
                continue  # e.g. quick mode without an S<2k point
            value, detail = ratios(num, den, key, pick)
            goals.append(harness.goal(name, value, target, stretch=stretch, judged=judged,
                                      detail=detail))
    return goals


# ---- output -------------------------------------------------------------------------------------

def table(rows: List[dict]) -> str:
    body = []
    for r in rows:
        mem = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / harness.MiB
        body.append([r["peer"] + (f" ({r['backend']})" if r.get("backend") else ""), r["d"],
                     r["S"], r["fwd_tflops"], r["bwd_tflops"], r["fwd_ms"], r["bwd_ms"], mem,
                     r["error"] or ""])
    return harness.md_table(["peer", "d", "S", "fwd TFLOP/s", "bwd TFLOP/s", "fwd ms", "bwd ms",
                             "peak MiB", "error"], body)


def plot(rows: List[dict], title: str):
    def make(out_dir: Path) -> List[Path]:
        import matplotlib.pyplot as plt
        ds = sorted({r["d"] for r in rows}, reverse=True)
        fig, axes = plt.subplots(2, len(ds), figsize=(6 * len(ds), 8), squeeze=False)
        for j, d in enumerate(ds):
            for i, key in enumerate(("fwd_tflops", "bwd_tflops")):
                ax = axes[i][j]
                for peer in dict.fromkeys(r["peer"] for r in rows):
                    pts = [(r["S"], r[key]) for r in rows
                           if r["peer"] == peer and r["d"] == d and r[key] is not None]
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=peer)
                ax.set_xscale("log", base=2)
                ax.set_xlabel("sequence length S")
                ax.set_ylabel(f"{key.split('_')[0]} TFLOP/s")
                ax.set_title(f"causal attention, d={d}, {key.split('_')[0]}")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
        return harness.save_figure(fig, out_dir / "attention_tflops.png", title)
    return make


def main(argv=None) -> int:
    run = harness.start("attention", argv)
    cfg = shapes(run)
    run.config = {"hidden": cfg["hidden"], "tokens_per_batch": cfg["tokens"],
                  "dtype": str(cfg["dtype"]), "S": cfg["S"], "d": cfg["d"], "causal": True,
                  "flops": "fwd 4*B*H*S^2*d/2, bwd 2.5 x fwd",
                  "materialized_peers_max_S": MATERIALIZED_MAX_S}
    for j, d in enumerate(cfg["d"]):
        H = cfg["hidden"] // d
        for S in cfg["S"]:
            B = max(1, cfg["tokens"] // S)
            for name, fn in peers_for(run, S, d, first_d=(j == 0)).items():
                if fn is None:
                    continue
                row = run.add_row(**measure(run, name, fn, B, H, S, d, cfg["dtype"]))
                fmt = lambda v: "–" if v is None else f"{v:.3g}"  # noqa: E731
                print(f"  {name:22s} d={d:3d} S={S:5d} fwd {fmt(row['fwd_tflops'])} "
                      f"bwd {fmt(row['bwd_tflops'])} TFLOP/s {row['error'] or ''}", flush=True)
    run.mark_failed_peers_missing()
    run.goals = attention_goals(run.rows, judged=run.is_cuda)
    run.finish(table(run.rows), plot(run.rows, f"causal attention, {run.slug}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
