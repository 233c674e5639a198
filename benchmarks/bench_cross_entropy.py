"""Linear cross-entropy (projection onto the vocabulary + softmax CE), forward + backward.

gptfast (lean schedule, and budgeted with memory_budget = gptfast.LINEAR_CE_BUDGET, 384 MiB;
"auto" backend, plus the CUDA C++ kernels by name) against eager with fp32 logits
(`F.cross_entropy((h @ w.T).float(), t)`), torch.compile of that, Liger's fused linear
cross-entropy (liger-kernel 0.8.5) and Apple's Cut Cross-Entropy (25.1.1, gradient filtering off)
when importable. bf16 on a GPU; gradients for hidden and weight. The budgeted goal is judged at
384 MiB, not 1 GiB: with 1 GiB the Llama-3 shape's gradients (1066 MiB) plus the budget pass half
of torch.compile's 3070 MiB by arithmetic.

On a GPU also cross-entropy over given logits (N x V, bf16; forward + in-place backward), whose
goal is bandwidth: it reads the logits twice and writes the gradient once, and its
`roofline_fraction` is those bytes over the copy bandwidth measured in the same run.

Reported per shape (N, D, V): time of one step, TFLOP/s (6·N·D·V per step), the fraction of the
roofline 6·N·D·V / (bf16 matmul rate measured in this run), and peak memory above the inputs
(the gradients included: (N·D + V·D) · 2 bytes of them are unavoidable).

On a GPU, also (quick mode included) the dW-accumulation microbenchmark at the three shapes:
the lean backward alone with dW accumulated by fp32 4-wide atomics into an fp32 buffer, by
16-bit 8-wide atomics into the gradient, and by a lock + read-modify-write into the gradient
(`dw_accumulation=` of the launcher): its time, memory, and dW's largest difference from the
fp32 accumulation, so that the lean design's default is chosen by numbers
(kernels/cross_entropy_configs.json, DW_ACCUM).

    python benchmarks/bench_cross_entropy.py [--quick] [--tiny] [--out DIR]

On the CPU (float32, small shapes) it shows what runs there: the chunked reference against the
materialized logits, in time and memory.
"""
from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

LEAN, BUDGETED = "gptfast-lean", "gptfast-budget-384MiB"
CUDA_LEAN = "gptfast-cuda-lean"                 # the CUDA C++ kernels by name (csrc/)
LOGITS = {"gptfast-cuda-logits": "cuda", "gptfast-triton-logits": "triton"}  # over given logits
TORCH_LOGITS = "torch-logits"
EAGER, COMPILED = "eager-fp32-logits", "torch.compile"
LIGER, CCE = "liger-fused-linear-ce", "cut-cross-entropy"
PINNED = {LIGER: ("liger-kernel", "0.8.5"), CCE: ("cut-cross-entropy", "25.1.1")}
LEAN_SLACK = 64 * harness.MiB          # lean goal: peak <= gradients + this

GPU_SHAPES = [("GPT-2", 16384, 768, 50257), ("Llama-3", 8192, 4096, 128256),
              ("Gemma-2", 8192, 2304, 256000)]


def shapes(run: harness.Run) -> List[tuple]:
    if run.is_cuda:
        return GPU_SHAPES[:2] if run.quick else GPU_SHAPES
    if run.tiny:
        return [("tiny", 256, 32, 2048)]
    return [("cpu-small", 2048, 128, 16384)]


# ---- the peers: each maps (hidden, weight, targets) to a scalar loss ---------------------------

def eager_loss(h, w, t):
    return F.cross_entropy((h @ w.T).float(), t)


def gptfast_loss(memory_budget: Optional[int], backend: str = "auto") -> Callable:
    import gptfast
    return lambda h, w, t: gptfast.linear_cross_entropy(h, w, t, memory_budget=memory_budget,
                                                        backend=backend)


def _version_note(peer: str) -> str:
    dist, pinned = PINNED[peer]
    have = importlib.metadata.version(dist)
    return have if have == pinned else f"{have} (pinned {pinned})"


def liger_loss() -> Callable:
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss)
    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda h, w, t: loss(w, h, t)


def cce_loss() -> Callable:
    from cut_cross_entropy import linear_cross_entropy
    # filter_eps=None turns gradient filtering off: every logit's gradient is computed, the
    # same work as the other peers.
    return lambda h, w, t: linear_cross_entropy(h, w, t, filter_eps=None)


def peers(run: harness.Run) -> Dict[str, Callable]:
    import gptfast
    out: Dict[str, Callable] = {LEAN: gptfast_loss(None),
                                BUDGETED: gptfast_loss(gptfast.LINEAR_CE_BUDGET),
                                EAGER: eager_loss}
    if run.is_cuda:
        out[CUDA_LEAN] = gptfast_loss(None, backend="cuda")
    else:
        run.missing(CUDA_LEAN, "CUDA C++ kernels (CPU run)")
    if run.is_cuda or not run.tiny:   # compiling on a small shared CPU takes too long for tests
        out[COMPILED] = torch.compile(eager_loss, dynamic=False)
    else:
        run.missing(COMPILED, "not compiled in the tiny CPU run (compile time)")
    for name, make in ((LIGER, liger_loss), (CCE, cce_loss)):
        if not run.is_cuda:
            run.missing(name, "Triton GPU kernels (CPU run)")
            continue
        try:
            fn = make()
            run.config.setdefault("peer_versions", {})[name] = _version_note(name)
            out[name] = fn
        except Exception as e:  # noqa: BLE001 - not installed, or fails to import
            run.missing(name, f"not importable: {harness.error_text(e)}")
    return out


# ---- measuring one shape ----------------------------------------------------------------------

def measure(run: harness.Run, label: str, name: str, fn: Callable, N: int, D: int, V: int,
            dtype, matmul_tflops: float) -> dict:
    elt = torch.empty((), dtype=dtype).element_size()
    flops = 6.0 * N * D * V
    row = dict(peer=name, shape=label, N=N, D=D, V=V, ms=None, tflops=None,
               roofline_fraction=None, peak_mem_bytes=None,
               grad_bytes=(N * D + V * D) * elt, loss=None, error=None)
    gen = torch.Generator(device=run.device).manual_seed(N + D + V)
    # Scaled like a trained model's last hidden state and tied embedding, so the softmax is
    # neither flat nor one-hot.
    h = (torch.randn(N, D, device=run.device, generator=gen) * 1.0).to(dtype).requires_grad_()
    w = (torch.randn(V, D, device=run.device, generator=gen) * 0.05).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), device=run.device, generator=gen)

    def clear_grads():
        h.grad = w.grad = None

    def step():
        clear_grads()                   # each step allocates its gradients, as in training
        fn(h, w, t).backward()
    try:
        row["loss"] = float(fn(h, w, t).detach())       # also the first call (compiles)
        row["ms"] = run.time_ms(step)
        row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
        row["roofline_fraction"] = (flops / (matmul_tflops * 1e12) * 1e3) / row["ms"]
        row["peak_mem_bytes"] = run.peak_bytes(step, setup=clear_grads)  # grads counted
    except Exception as e:  # noqa: BLE001 - a failing peer is a row with its error
        row["error"] = "out of memory" if harness.is_oom(e) else harness.error_text(e)
    finally:
        h.grad = w.grad = None
        del h, w, t
        run.empty_cache()
    return row


# ---- cross-entropy over given logits (GPU only) ------------------------------------------------

LOGITS_SHAPES = [("logits GPT-2", 16384, 50257), ("logits Llama-3", 8192, 128256)]


def measure_logits(run: harness.Run, label: str, name: str, N: int, V: int, dtype) -> dict:
    """Forward + backward over given (N, V) logits; the gradient written in place for gptfast."""
    import torch.nn.functional as F  # noqa: N812
    import gptfast
    elt = torch.empty((), dtype=dtype).element_size()
    moved = 3 * N * V * elt            # read in forward, read + write in backward
    row = dict(peer=name, shape=label, N=N, D=0, V=V, ms=None, tflops=None,
               roofline_fraction=None, peak_mem_bytes=None, grad_bytes=N * V * elt, loss=None,
               error=None)
    gen = torch.Generator(device=run.device).manual_seed(N + V)
    x = (torch.randn(N, V, device=run.device, generator=gen) * 2).to(dtype)
    t = torch.randint(0, V, (N,), device=run.device, generator=gen)
    backend = LOGITS.get(name)

    def step():
        logits = x.detach().clone().requires_grad_()   # a fresh leaf, as a model's output
        if backend is None:
            loss = F.cross_entropy(logits.float(), t)
        else:
            loss = gptfast.cross_entropy(logits, t, inplace_backward=True, backend=backend)
        loss.backward()
        return loss
    try:
        row["loss"] = float(step().detach())
        clone_ms = run.time_ms(lambda: x.clone())   # the clone is not the op's: subtract it
        row["ms"] = max(run.time_ms(step) - clone_ms, 1e-6)
        row["roofline_fraction"] = moved / (row["ms"] * 1e-3) / (run.ceilings["copy_TBps"] * 1e12)
        row["peak_mem_bytes"] = run.peak_bytes(step)
    except Exception as e:  # noqa: BLE001 - a failing peer is a row with its error
        row["error"] = "out of memory" if harness.is_oom(e) else harness.error_text(e)
    finally:
        del x, t
        run.empty_cache()
    return row


# ---- the dW-accumulation microbenchmark (GPU only) ------------------------------------------------

DW_MODES = {"fp32": "fp32 4-wide atomics, fp32 buffer", "atomic": "16-bit 8-wide atomics",
            "lock": "lock + read-modify-write"}


def dw_accumulation_rows(run: harness.Run, dtype, shapes=GPU_SHAPES) -> List[dict]:
    """The lean backward alone, per way of accumulating dW, at the three shapes (rows with
    kind "dw_accumulation"; FLOPs 6·N·D·V for the backward)."""
    from gptfast.kernels import cross_entropy as ce
    opts = dict(ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None)
    rows = []
    for label, N, D, V in shapes:
        gen = torch.Generator(device=run.device).manual_seed(N + D + V)
        h = (torch.randn(N, D, device=run.device, generator=gen)).to(dtype)
        w = (torch.randn(V, D, device=run.device, generator=gen) * 0.05).to(dtype)
        t = torch.randint(0, V, (N,), device=run.device, generator=gen)
        g = torch.full((N,), 1.0 / N, device=run.device)
        _, lse, _ = ce.linear_cross_entropy_forward(h, w, t, None, reduction="none", **opts)
        ref = None
        for mode, what in DW_MODES.items():
            row = dict(kind="dw_accumulation", peer=f"lean backward: {what}", shape=label, N=N,
                       D=D, V=V, ms=None, tflops=None, roofline_fraction=None,
                       peak_mem_bytes=None, grad_bytes=(N * D + V * D) * h.element_size(),
                       dw_max_diff_vs_fp32=None, error=None)

            def bwd(mode=mode):
                return ce.linear_cross_entropy_backward(g, None, h, w, t, None, lse,
                                                        dw_accumulation=mode, **opts)
            try:
                dw = bwd()[1]
                if mode == "fp32":
                    ref = dw.float()
                elif ref is not None:  # relative to the largest |dW|
                    row["dw_max_diff_vs_fp32"] = float((dw.float() - ref).abs().max()
                                                       / ref.abs().max())
                del dw
                row["ms"] = run.time_ms(bwd)
                row["tflops"] = 6.0 * N * D * V / (row["ms"] * 1e-3) / 1e12
                row["roofline_fraction"] = row["tflops"] / run.ceilings["matmul_tflops"]
                row["peak_mem_bytes"] = run.peak_bytes(bwd)
            except Exception as e:  # noqa: BLE001 - a failing mode is a row with its error
                row["error"] = "out of memory" if harness.is_oom(e) else harness.error_text(e)
            rows.append(run.add_row(**row))
            print(f"  {label:10s} dW {mode:6s} " + ("–" if row["ms"] is None
                                                     else f"{row['ms']:.3g} ms") + " "
                  + (row["error"] or ""), flush=True)
        del h, w, t, g, lse, ref
        run.empty_cache()
    return rows


# ---- goals (pure: unit-tested on synthetic rows) --------------------------------------------------

def _get(rows, peer, shape, key):
    for r in rows:
        if r["peer"] == peer and r["shape"] == shape:
            return r.get(key)
    return None


def cross_entropy_goals(rows: List[dict], judged: bool = True) -> List[dict]:
    """The cross-entropy issue's goals, each judged at its worst shape."""
    labels = list(dict.fromkeys(r["shape"] for r in rows))

    def per_shape(fn, direction):
        pts = {s: fn(s) for s in labels}
        detail = ", ".join(f"{s}: " + ("–" if v is None else f"{v:.2f}") for s, v in pts.items())
        return harness.worst(pts.values(), direction), detail

    def lean_mem(s):
        g = _get(rows, LEAN, s, "grad_bytes")
        return harness.ratio(_get(rows, LEAN, s, "peak_mem_bytes"),
                             None if g is None else g + LEAN_SLACK)

    logit_labels = [lb for lb in labels if lb.startswith("logits")]
    labels = [lb for lb in labels if not lb.startswith("logits")]
    spec = [
        ("lce lean peak memory / (gradients + 64 MiB)", lean_mem, 1.0, "<="),
        ("lce cuda lean peak memory / (gradients + 64 MiB)",
         lambda s: harness.ratio(_get(rows, CUDA_LEAN, s, "peak_mem_bytes"),
                                 None if _get(rows, CUDA_LEAN, s, "grad_bytes") is None
                                 else _get(rows, CUDA_LEAN, s, "grad_bytes") + LEAN_SLACK), 1.0, "<="),
        ("lce cuda lean speed vs Cut CE (time ratio)",
         lambda s: harness.ratio(_get(rows, CCE, s, "ms"), _get(rows, CUDA_LEAN, s, "ms")), 1.0, ">="),
        ("lce lean speed vs Cut CE (time ratio)",
         lambda s: harness.ratio(_get(rows, CCE, s, "ms"), _get(rows, LEAN, s, "ms")), 1.0, ">="),
        ("lce budget(384 MiB) speed vs torch.compile",
         lambda s: harness.ratio(_get(rows, COMPILED, s, "ms"), _get(rows, BUDGETED, s, "ms")),
         1.0, ">="),
        ("lce budget(384 MiB) memory / torch.compile memory",
         lambda s: harness.ratio(_get(rows, BUDGETED, s, "peak_mem_bytes"),
                                 _get(rows, COMPILED, s, "peak_mem_bytes")), 0.5, "<"),
    ]
    goals = []
    for name, fn, target, direction in spec:
        value, detail = per_shape(fn, direction)
        goals.append(harness.goal(name, value, target, direction=direction, judged=judged,
                                  detail=detail))
    if logit_labels:  # the CUDA row kernels: bytes moved over the measured copy bandwidth
        labels = logit_labels
        value, detail = per_shape(
            lambda s: _get(rows, "gptfast-cuda-logits", s, "roofline_fraction"), ">=")
        goals.append(harness.goal("ce over logits (cuda) / copy bandwidth", value, 0.85,
                                  judged=judged, detail=detail))
    return goals


# ---- output -------------------------------------------------------------------------------------

def _main_rows(rows: List[dict]) -> List[dict]:
    return [r for r in rows if r.get("kind") != "dw_accumulation"]


def table(rows: List[dict]) -> str:
    def mib(x):
        return None if x is None else x / harness.MiB
    body = [[r["shape"], r["peer"], r["ms"], r["tflops"], r["roofline_fraction"],
             mib(r["peak_mem_bytes"]), mib(r["grad_bytes"]), r["loss"], r["error"] or ""]
            for r in _main_rows(rows)]
    text = harness.md_table(["shape", "peer", "ms", "TFLOP/s", "of roofline", "peak MiB",
                             "grads MiB", "loss", "error"], body)
    dw = [[r["shape"], r["peer"], r["ms"], r["tflops"], r["roofline_fraction"],
           mib(r["peak_mem_bytes"]), r["dw_max_diff_vs_fp32"], r["error"] or ""]
          for r in rows if r.get("kind") == "dw_accumulation"]
    if dw:
        text += ("\n\ndW accumulation of the lean backward (backward alone, 6·N·D·V FLOPs; "
                 "dW difference relative to max |dW| of the fp32 accumulation):\n\n"
                 + harness.md_table(["shape", "dW accumulation", "ms", "TFLOP/s",
                                     "of roofline", "peak MiB", "dW diff vs fp32", "error"], dw))
    return text


def plot(rows: List[dict], title: str):
    rows = _main_rows(rows)

    def make(out_dir: Path) -> List[Path]:
        import matplotlib.pyplot as plt
        labels = list(dict.fromkeys(r["shape"] for r in rows))
        names = list(dict.fromkeys(r["peer"] for r in rows))
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            for ax, key, scale in ((axes[0], "ms", 1.0), (axes[1], "peak_mem_bytes", harness.MiB)):
                vals = [(_get(rows, name, s, key) or 0) / scale for s in labels]
                ax.bar([x + i * width for x in range(len(labels))], vals, width, label=name)
        for ax, what in ((axes[0], "time per step (ms)"), (axes[1], "peak memory above inputs (MiB)")):
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))])
            ax.set_xticklabels(labels)
            ax.set_ylabel(what)
            ax.set_yscale("log")
            ax.grid(alpha=0.3, axis="y")
        axes[0].legend(fontsize=7)
        return harness.save_figure(fig, out_dir / "cross_entropy_time_memory.png", title)
    return make


def main(argv=None) -> int:
    run = harness.start("cross_entropy", argv)
    dtype = torch.bfloat16 if run.is_cuda else torch.float32
    run.config = {"dtype": str(dtype), "shapes": [list(s) for s in shapes(run)],
                  "flops": "6*N*D*V per step (forward + backward)",
                  "roofline": "6*N*D*V / measured matmul rate",
                  "memory": "peak allocated above the inputs during one step, gradients included"}
    fns = peers(run)
    for label, N, D, V in shapes(run):
        for name, fn in fns.items():
            row = run.add_row(**measure(run, label, name, fn, N, D, V, dtype,
                                        run.ceilings["matmul_tflops"]))
            print(f"  {label:10s} {name:22s} "
                  + ("–" if row["ms"] is None else f"{row['ms']:.3g} ms") + " "
                  + ("" if row["peak_mem_bytes"] is None
                     else f"{row['peak_mem_bytes'] / harness.MiB:.0f} MiB ")
                  + (row["error"] or ""), flush=True)
    if run.is_cuda:
        for label, N, V in (LOGITS_SHAPES[:1] if run.quick else LOGITS_SHAPES):
            for name in (*LOGITS, TORCH_LOGITS):
                row = run.add_row(**measure_logits(run, label, name, N, V, dtype))
                print(f"  {label:14s} {name:22s} "
                      + ("–" if row["ms"] is None else f"{row['ms']:.3g} ms, "
                         f"{row['roofline_fraction']:.2f} of copy bandwidth ")
                      + (row["error"] or ""), flush=True)
        dw_accumulation_rows(run, dtype)
    else:
        for name in (*LOGITS, TORCH_LOGITS):
            run.skip(name, "logits", "cross-entropy over logits is measured on a GPU only")
        run.skip("dW accumulation microbenchmark", "all shapes",
                 "16-bit atomics at the GPU shapes need a GPU")
    run.mark_failed_peers_missing()
    run.goals = cross_entropy_goals(_main_rows(run.rows), judged=run.is_cuda)
    run.finish(table(run.rows), plot(run.rows, f"linear cross-entropy, {run.slug}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
