"""Shared machinery of the benchmark scripts: arguments, environment facts, ceilings, timing,
peak memory, peers that may be missing, goals, and the output files.

Every `bench_<name>.py` does

    run = harness.start("attention", argv)      # parses --quick/--tiny/--out, measures ceilings
    ms = run.time_ms(fn, grad_to_none=[q, k, v])
    mem = run.peak_bytes(fn)
    run.add_row(...); run.missing("sdpa-cudnn", "why"); run.goals = [...]
    run.finish(markdown_table, plot_fn)          # <out>/<name>.json, .md, .png

Timing: on CUDA `triton.testing.do_bench` (CUDA events, L2 flushed, median) after its warm-up;
on the CPU the median of `time.perf_counter` over a few calls after one warm-up call.
Peak memory: on CUDA `max_memory_allocated` above what was allocated before the call; on the
CPU glibc's `mallinfo2` in-use bytes, sampled by a thread while the call runs (torch's CPU
allocator is malloc; large ops release the GIL, so the sampler sees their buffers). The CPU
figure is therefore approximate, good for "chunked vs materialized", not for 5 % differences.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import REPO, git_info, kernel_hash  # noqa: E402,F401 (re-exported)

MiB = 1 << 20
GiB = 1 << 30

# ---- arguments --------------------------------------------------------------------------------


def parse_args(name: str, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"bench_{name}.py",
                                description=f"gptfast {name} benchmark against its peers")
    p.add_argument("--quick", action="store_true", help="fewer points (what `make gpu-check` runs)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny shapes for the test suite (also GPTFAST_BENCH_TINY=1)")
    p.add_argument("--out", default=None,
                   help="output folder (default benchmarks/results/<device-slug>/ in a source "
                        "checkout, else ./gptfast-bench/<device-slug>/)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    a = p.parse_args(argv)
    a.tiny = a.tiny or os.environ.get("GPTFAST_BENCH_TINY", "0") == "1"
    a.quick = a.quick or a.tiny
    return a


# ---- environment facts --------------------------------------------------------------------------

def default_out_dir(slug: str) -> Path:
    """benchmarks/results/<slug>/ in a source checkout; ./gptfast-bench/<slug>/ when the
    benchmarks run from an installed package (never inside site-packages)."""
    if (REPO / "setup.py").is_file() and (REPO / "benchmarks" / "harness.py").is_file():
        return REPO / "benchmarks" / "results" / slug
    return Path.cwd() / "gptfast-bench" / slug


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "-".join("".join(c if c.isalnum() else " " for c in name).split())


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda}
    for mod in ("triton", "gptfast"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - a version is a fact, never a failure
            out[mod] = f"unavailable ({type(e).__name__})"
    return out


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return (f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                f"{p.total_memory / GiB:.0f} GiB")
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# ---- timing and memory --------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, quick: bool = False,
            grad_to_none: Optional[Iterable[torch.Tensor]] = None) -> float:
    """Median milliseconds of fn() after warm-up (CUDA events on a GPU, perf_counter on CPU)."""
    grads = list(grad_to_none or [])
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=10 if quick else 25,
                                             rep=40 if quick else 100,
                                             grad_to_none=grads or None, return_mode="median"))

    def call():
        for t in grads:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    call()                                   # warm-up (allocator, lazy init, first-call caches)
    first = call()
    # Slow calls get fewer repeats: the CPU run is a smoke test of the same code paths.
    reps = 1 if first > 2000 else (3 if quick else 5)
    return statistics.median([first] + [call() for _ in range(reps - 1)])


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks",
                                               "keepcost")]


def _malloc_in_use() -> Optional[Callable[[], int]]:
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def in_use() -> int:
        m = fn()
        return m.uordblks + m.hblkhd      # heap chunks in use + mmapped chunks (big tensors)
    return in_use


def peak_bytes(fn: Callable[[], object], device: torch.device,
               setup: Optional[Callable[[], object]] = None) -> Optional[int]:
    """Peak bytes allocated above what was allocated when fn() started, during one call.

    setup() runs before each measured call, outside the measurement: clear there the
    gradients a previous call left, or the call's own gradients replace them unseen and the
    peak leaves them out."""
    setup = setup or (lambda: None)
    if device.type == "cuda":
        setup()
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    in_use = _malloc_in_use()
    if in_use is None:
        return None
    # Sampling can miss a short-lived buffer; the peak is a maximum, so take it over a few
    # calls (each starting from the same state).
    peaks = []
    for _ in range(3):
        setup()
        peaks.append(_sampled_peak(fn, in_use))
    return max(peaks)


def _sampled_peak(fn: Callable[[], object], in_use: Callable[[], int]) -> int:
    base = in_use()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], in_use())
            time.sleep(0)  # yield the GIL, poll again: big ops release it
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        stop.set()
        th.join()
    return int(max(peak[0], in_use()) - base)


# ---- ceilings -----------------------------------------------------------------------------------

def measure_ceilings(device: torch.device, quick: bool, tiny: bool) -> dict:
    """The matmul rate (bf16 8192^3 on a GPU) and copy bandwidth (read + write) of this run."""
    t0 = time.perf_counter()
    if device.type == "cuda":
        n, dtype, copy_bytes = 8192, torch.bfloat16, GiB
    else:  # a CPU proxy: fp32 (bf16 CPU matmuls are emulated on many CPUs)
        n, dtype, copy_bytes = (256 if tiny else 1024), torch.float32, (16 if tiny else 64) * MiB
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, quick=quick)
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src), device, quick=quick)
    return {
        "matmul": f"{str(dtype).replace('torch.', '')} {n}x{n}x{n}",
        "matmul_tflops": 2 * n ** 3 / (ms * 1e-3) / 1e12,
        "copy_bytes": copy_bytes,
        "copy_TBps": 2 * copy_bytes / (copy_ms * 1e-3) / 1e12,
        "seconds": time.perf_counter() - t0,
    }


# ---- goals --------------------------------------------------------------------------------------

_COMPARE = {">=": lambda m, t: m >= t, "<=": lambda m, t: m <= t, "<": lambda m, t: m < t}


def goal(name: str, measured_ratio: Optional[float], target: float, *, direction: str = ">=",
         stretch: bool = False, judged: bool = True, detail: str = "") -> dict:
    """One goal row. met is None when the ratio could not be measured (a peer is missing) or
    the run does not judge it (a CPU run of a GPU goal)."""
    met = None
    if measured_ratio is not None and judged:
        met = bool(_COMPARE[direction](measured_ratio, target))
    return {"name": name, "measured_ratio": measured_ratio, "target": target,
            "direction": direction, "met": met, "stretch": stretch, "detail": detail}


def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return None if num is None or den in (None, 0) else num / den


def worst(values: Iterable[Optional[float]], direction: str = ">=") -> Optional[float]:
    """The value that decides "at every point": the minimum for >= goals, the maximum for <=.
    None when any point is missing, so a goal is never judged on part of its points."""
    vals = list(values)
    if not vals or any(v is None for v in vals):
        return None
    return min(vals) if direction == ">=" else max(vals)


# ---- the run ------------------------------------------------------------------------------------

def save_figure(fig, path, title: Optional[str] = None) -> list:
    """Lay out, title, write (PNG) and close a matplotlib figure; returns [path] for the run."""
    import matplotlib.pyplot as plt
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def goals_table(goals: Sequence[dict]) -> str:
    rows = []
    for g in goals:
        state = {True: "met", False: "MISS", None: "not judged"}[g["met"]]
        rows.append([g["name"] + (" (stretch)" if g["stretch"] else ""),
                     None if g["measured_ratio"] is None else round(g["measured_ratio"], 3),
                     f"{g['direction']} {g['target']}", state])
    return md_table(["goal", "measured", "target", "state"], rows)


class Run:
    """One benchmark script's run: its environment, measurements and outputs."""

    def __init__(self, name: str, args: argparse.Namespace):
        self.name, self.args = name, args
        want_cuda = args.device in ("auto", "cuda")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"bench_{name}: --device cuda but no CUDA device is available")
        self.device = torch.device("cuda" if want_cuda and torch.cuda.is_available() else "cpu")
        self.is_cuda = self.device.type == "cuda"
        self.quick, self.tiny = args.quick, args.tiny
        self.slug = device_slug(self.device)
        self.out_dir = Path(args.out) if args.out else default_out_dir(self.slug)
        self.rows: List[dict] = []
        self.goals: List[dict] = []
        self.missing_peers: List[dict] = []
        self.skipped: List[dict] = []
        self.config: dict = {}
        self.timer: Optional[str] = None     # a script that times otherwise says how
        self.started = time.time()
        if self.is_cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
        else:
            # One thread by default: on a shared, loaded CPU every OpenMP barrier of a
            # multi-threaded op can cost a scheduler quantum (tens of ms), which swamps small ops.
            torch.set_num_threads(int(os.environ.get("GPTFAST_BENCH_THREADS", "1")))
        print(f"bench {name}: {device_description(self.device)}"
              f"{' quick' if self.quick else ''}{' tiny' if self.tiny else ''}", flush=True)
        self.ceilings = measure_ceilings(self.device, self.quick, self.tiny)
        c = self.ceilings
        print(f"ceilings: {c['matmul']} matmul {c['matmul_tflops']:.3g} TFLOP/s, "
              f"copy {c['copy_TBps']:.3g} TB/s", flush=True)

    # measurements
    def time_ms(self, fn, grad_to_none=None) -> float:
        return time_ms(fn, self.device, quick=self.quick, grad_to_none=grad_to_none)

    def peak_bytes(self, fn, setup=None) -> Optional[int]:
        return peak_bytes(fn, self.device, setup)

    def sync(self) -> None:
        _sync(self.device)

    def empty_cache(self) -> None:
        if self.is_cuda:
            torch.cuda.empty_cache()

    # bookkeeping
    def add_row(self, **row) -> dict:
        self.rows.append(row)
        return row

    def missing(self, peer: str, reason: str) -> None:
        """A peer that should be in the table and is not (not installed, failed, no CUDA)."""
        if not any(m["peer"] == peer for m in self.missing_peers):
            self.missing_peers.append({"peer": peer, "reason": reason})
            print(f"  missing peer {peer}: {reason}", flush=True)

    def mark_failed_peers_missing(self) -> None:
        """A peer whose every row failed is missing, not just slow: it must not pass quietly."""
        for r in self.rows:
            if r["error"] and all(x["error"] for x in self.rows if x["peer"] == r["peer"]):
                self.missing(r["peer"], f"failed at every point: {r['error']}")

    def skip(self, peer: str, where: str, reason: str) -> None:
        """A point left out by design (quick mode, a memory limit): not a missing peer."""
        self.skipped.append({"peer": peer, "where": where, "reason": reason})

    def record(self) -> dict:
        return {
            "benchmark": self.name,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_description(self.device),
            "device_type": self.device.type,
            "device_slug": self.slug,
            "quick": self.quick,
            "tiny": self.tiny,
            "versions": versions(),
            "git": git_info(),
            "kernel_hash": kernel_hash(),
            "timer": self.timer or ("triton.testing.do_bench median (CUDA events)"
                                    if self.is_cuda else "time.perf_counter median"),
            "ceilings": self.ceilings,
            "config": self.config,
            "rows": self.rows,
            "goals": self.goals,
            "missing_peers": self.missing_peers,
            "skipped": self.skipped,
            "seconds": time.time() - self.started,
        }

    def finish(self, table_md: str, plot: Optional[Callable[[Path], List[Path]]] = None) -> dict:
        """Write <out>/<name>.json, <name>.md and the plots; print the table. Returns the record."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        plots: List[str] = []
        if plot is not None:
            try:
                import matplotlib
                matplotlib.use("Agg")
                plots = [p.name for p in plot(self.out_dir)]
            except Exception as e:  # noqa: BLE001 - a plot never costs the numbers
                print(f"  plots skipped: {type(e).__name__}: {e}", flush=True)
        rec = self.record()
        rec["plots"] = plots
        md = [f"## {self.name} — {rec['device']}", "",
              f"commit {rec['git']['commit'][:10]}{' (dirty)' if rec['git']['dirty'] else ''}, "
              f"kernels {rec['kernel_hash']}, torch {rec['versions']['torch']}, "
              f"{rec['timer']}"
              f"{', quick' if self.quick else ''}{', tiny' if self.tiny else ''}", "",
              table_md, ""]
        if self.goals:
            md += ["Goals:", "", goals_table(self.goals), ""]
        if self.missing_peers:
            md += ["Missing peers: " + "; ".join(f"{m['peer']} ({m['reason']})"
                                                 for m in self.missing_peers), ""]
        text = "\n".join(md)
        (self.out_dir / f"{self.name}.md").write_text(text)
        tmp = self.out_dir / f".{self.name}.json.tmp"
        tmp.write_text(json.dumps(rec, indent=1, default=str))
        tmp.replace(self.out_dir / f"{self.name}.json")
        print(text, flush=True)
        print(f"wrote {self.out_dir / (self.name + '.json')}", flush=True)
        return rec


def start(name: str, argv: Optional[Sequence[str]] = None) -> Run:
    return Run(name, parse_args(name, argv))


def error_text(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200] if msg else ''}"


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


if __name__ == "__main__":  # pragma: no cover - a quick look at this machine's ceilings
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps(measure_ceilings(dev, quick=True, tiny=False), indent=1))
    sys.exit(0)
