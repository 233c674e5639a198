"""Host cost of each public op, side by side with PyTorch's op on the same tiny inputs.

What is timed is everything a call costs the host besides the GPU work: argument checks, backend
choice, autograd, the op boundary, and (in forward + backward) the autograd engine. On the CPU
the Triton launchers of `gptfast.kernels` are stubbed (they return correctly shaped empty
outputs), so gptfast runs its real Python path on backend="triton" without the interpreter's
cost; PyTorch's ops run for real (on tiny inputs their compute is a small part of their time).
On a GPU nothing is stubbed: real launches, backend "auto".

Timer: `time.thread_time` (CPU time of this thread), so other processes on a shared machine
do not count. Used by `bench_host.py` (pytest-benchmark, the committed numbers) and by
`tests/test_host_overhead.py` (CI: the ratios with slack, medians of interleaved rounds).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

if not torch.cuda.is_available():  # before Triton or gptfast are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

import gptfast  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
BACKEND = "auto" if ON_GPU else "triton"
TIMER = time.thread_time

# Goals (issue 9): gptfast's host time / PyTorch's, at most.
GOALS = {
    "attention fwd (no_grad)": 3.0,
    "attention fwd+bwd": 1.5,
    "linear_cross_entropy fwd+bwd": 1.5,
}


# ---- launch stubs -------------------------------------------------------------------------------

def _attention_forward(q, k, v, **_):
    B, H, S, _d = q.shape
    return torch.empty_like(q), q.new_empty((B, H, S), dtype=torch.float32)


# Gradients are zeros, not empty: they accumulate into the same .grad tensors the PyTorch side
# adds to, and garbage (denormals) would slow PyTorch's arithmetic down.
def _attention_backward(do, q, k, v, out, lse, **_):
    return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _ce_forward(logits, targets, **_):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


def _ce_backward(grad_rows, grad_lse, logits, targets, lse, *, inplace=False, **_):
    return logits.zero_() if inplace else torch.zeros_like(logits)


def _lce_forward(hidden, weight, targets, bias, **_):
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32),
            None)


def _lce_backward(grad_rows, grad_lse, hidden, weight, targets, bias, lse, **_):
    return (torch.zeros_like(hidden), torch.zeros_like(weight),
            torch.zeros_like(bias) if bias is not None else None)


STUBS = {
    "attention": dict(attention_forward=_attention_forward, attention_backward=_attention_backward),
    "cross_entropy": dict(cross_entropy_forward=_ce_forward, cross_entropy_backward=_ce_backward,
                          linear_cross_entropy_forward=_lce_forward,
                          linear_cross_entropy_backward=_lce_backward),
}


@contextlib.contextmanager
def launches_stubbed(enabled: bool = not ON_GPU):
    """Replace the Triton launchers by shape-correct stubs (no-op when `enabled` is False)."""
    if not enabled:
        yield
        return
    from gptfast.kernels import attention, cross_entropy
    mods = {"attention": attention, "cross_entropy": cross_entropy}
    saved = {(m, n): getattr(mods[m], n) for m, fns in STUBS.items() for n in fns}
    try:
        for m, fns in STUBS.items():
            for n, fn in fns.items():
                setattr(mods[m], n, fn)
        yield
    finally:
        for (m, n), fn in saved.items():
            setattr(mods[m], n, fn)


# ---- the cases ----------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    gptfast: Callable[[], object]
    torch: Callable[[], object]
    torch_label: str


def _no_grad(fn):
    def run():
        with torch.no_grad():
            fn()
    return run


def make_cases() -> List[Case]:
    g = torch.Generator().manual_seed(0)

    def randn(*shape, grad=False):
        t = torch.randn(*shape, generator=g).to(DEVICE)
        return t.requires_grad_() if grad else t

    # attention: (B, H, S, d) = (1, 2, 16, 32), causal
    q, k, v = (randn(1, 2, 16, 32, grad=True) for _ in range(3))
    dout = randn(1, 2, 16, 32)

    def attn_fb():
        torch.autograd.backward(gptfast.attention(q, k, v, backend=BACKEND), dout)

    def sdpa_fb():
        torch.autograd.backward(F.scaled_dot_product_attention(q, k, v, is_causal=True), dout)

    # cross-entropy: N = 16 rows, D = 32, V = 64
    h, w = randn(16, 32, grad=True), randn(64, 32, grad=True)
    t = torch.randint(0, 64, (16,), generator=g).to(DEVICE)
    logits = randn(16, 64, grad=True)

    def lce_fb():
        gptfast.linear_cross_entropy(h, w, t, backend=BACKEND).backward()

    def lce_torch_fb():
        F.cross_entropy(h @ w.t(), t).backward()

    def ce_fb():
        gptfast.cross_entropy(logits, t, backend=BACKEND).backward()

    def ce_torch_fb():
        F.cross_entropy(logits, t).backward()

    return [
        Case("attention fwd (no_grad)",
             _no_grad(lambda: gptfast.attention(q, k, v, backend=BACKEND)),
             _no_grad(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
             "F.scaled_dot_product_attention"),
        Case("attention fwd+bwd", attn_fb, sdpa_fb, "F.scaled_dot_product_attention"),
        Case("linear_cross_entropy fwd (no_grad)",
             _no_grad(lambda: gptfast.linear_cross_entropy(h, w, t, backend=BACKEND)),
             _no_grad(lambda: F.cross_entropy(h @ w.t(), t)), "F.cross_entropy(h @ W.T, y)"),
        Case("linear_cross_entropy fwd+bwd", lce_fb, lce_torch_fb, "F.cross_entropy(h @ W.T, y)"),
        Case("cross_entropy fwd+bwd", ce_fb, ce_torch_fb, "F.cross_entropy(logits, y)"),
    ]


# ---- interleaved measurement (CI) -----------------------------------------------------------------

def per_call_us(fn: Callable[[], object], calls: int) -> float:
    t0 = TIMER()
    for _ in range(calls):
        fn()
    return (TIMER() - t0) / calls * 1e6


def measure_ratios(cases: Optional[List[Case]] = None, rounds: int = 15,
                   calls: int = 100) -> Dict[str, dict]:
    """name -> {gptfast_us, torch_us, ratio}: medians over `rounds` rounds, each timing gptfast
    and PyTorch back to back, in alternating order (so a slow moment of the machine hits both,
    and neither always runs on the other's caches)."""
    cases = cases if cases is not None else make_cases()
    out = {}
    with launches_stubbed():
        for case in cases:
            for fn in (case.gptfast, case.torch):  # warm-up: caches, allocator, first calls
                for _ in range(20):
                    fn()
            ours, theirs, ratios = [], [], []
            for r in range(rounds):
                if r % 2:  # alternate who goes first: neither inherits the other's warm caches
                    b = per_call_us(case.torch, calls)
                    a = per_call_us(case.gptfast, calls)
                else:
                    a = per_call_us(case.gptfast, calls)
                    b = per_call_us(case.torch, calls)
                ours.append(a)
                theirs.append(b)
                ratios.append(a / b)
            out[case.name] = dict(gptfast_us=statistics.median(ours),
                                  torch_us=statistics.median(theirs),
                                  ratio=statistics.median(ratios), torch_op=case.torch_label)
    return out


def import_ratio(runs: int = 5) -> dict:
    """`import gptfast` / `import torch` wall time, medians over fresh interpreters."""
    import subprocess
    import sys
    code = ("import time; t = time.perf_counter(); import torch; a = time.perf_counter() - t; "
            "import gptfast; print(a, time.perf_counter() - t)")
    torch_s, both_s = [], []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True).stdout.split()
        torch_s.append(float(out[0]))
        both_s.append(float(out[1]))
    ratios = [b / a for a, b in zip(torch_s, both_s)]
    return dict(torch_s=statistics.median(torch_s), gptfast_s=statistics.median(both_s),
                ratio=statistics.median(ratios))
