"""Host cost of gptfast's public ops against PyTorch's own, with pytest-benchmark.

    pytest benchmarks/bench_host.py            # a few seconds on a CPU; writes
                                               # benchmarks/results/host/<device>.{json,md}
    pytest benchmarks/bench_host.py --benchmark-json=out.json   # pytest-benchmark's own record
    GPTFAST_HOST_OUT=$OUT python3 -m pytest benchmarks/bench_host.py   # on a GPU machine

Each case (benchmarks/host_cases.py) is timed twice, as gptfast and as PyTorch's op on the same
tiny inputs; on the CPU the Triton launches are stubbed, on a GPU they are real. At the end the
ratios (gptfast / PyTorch, medians) are printed against the goals and written under
benchmarks/results/host/. Without the pytest-benchmark plugin (the offline GPU machines),
benchmarks/conftest.py supplies a `benchmark` fixture with the same interface.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_cases  # noqa: E402  (sets TRITON_INTERPRET before gptfast is imported)
from provenance import REPO, git_info, kernel_hash  # noqa: E402

CASES = {c.name: c for c in host_cases.make_cases()}
RESULTS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_report():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with host_cases.launches_stubbed():
        yield
    _report()
    torch.set_num_threads(before)


@pytest.mark.benchmark(timer=host_cases.TIMER, min_rounds=20, max_time=0.4, warmup=True,
                       warmup_iterations=50)
@pytest.mark.parametrize("impl", ["gptfast", "torch"])
@pytest.mark.parametrize("name", list(CASES))
def test_host_cost(benchmark, name, impl):
    case = CASES[name]
    benchmark.group = name
    benchmark.extra_info["impl"] = impl if impl == "gptfast" else case.torch_label
    benchmark(getattr(case, impl))
    RESULTS.setdefault(name, {})[impl] = benchmark.stats.stats.median * 1e6  # us per call


def _report():
    if not RESULTS:
        return
    device = (torch.cuda.get_device_name() if host_cases.ON_GPU else "cpu")
    slug = "-".join("".join(c if c.isalnum() else " " for c in device.lower()).split())
    # The goals are judged on interleaved rounds (gptfast and PyTorch timed back to back, the
    # median of the per-round ratios): separate pytest-benchmark runs drift with the machine's
    # load between them.
    with host_cases.launches_stubbed():
        paired = host_cases.measure_ratios(list(CASES.values()), rounds=21, calls=100)
    rows = []
    for name, r in RESULTS.items():
        if "gptfast" not in r or "torch" not in r:
            continue
        p = paired[name]
        goal = host_cases.GOALS.get(name)
        rows.append(dict(case=name, gptfast_us=round(r["gptfast"], 2),
                         torch_us=round(r["torch"], 2), torch_op=CASES[name].torch_label,
                         paired_gptfast_us=round(p["gptfast_us"], 2),
                         paired_torch_us=round(p["torch_us"], 2), ratio=round(p["ratio"], 2),
                         goal=goal, met=None if goal is None else p["ratio"] <= goal))
    imp = host_cases.import_ratio(runs=3)
    record = dict(device=device, launches="real" if host_cases.ON_GPU else "stubbed",
                  backend=host_cases.BACKEND, timer="time.thread_time",
                  ratio_method="median over 21 interleaved rounds of 100 calls each",
                  torch=torch.__version__, **git_info(), kernel_hash=kernel_hash(),
                  date=time.strftime("%Y-%m-%d"), rows=rows,
                  import_gptfast_over_torch=dict(goal=1.3, **{k: round(v, 3)
                                                              for k, v in imp.items()}))
    lines = [f"Host cost per call, {device}, launches {record['launches']}, backend "
             f"{host_cases.BACKEND!r}, torch {torch.__version__}, commit "
             f"{record.get('commit', '?')}, {record['date']}", "",
             "pytest-benchmark medians (each op timed on its own), then the same pair timed in "
             "21 interleaved rounds; the ratio (gptfast / PyTorch, median of the rounds' ratios) "
             "is what the goals judge. Timer: CPU time of the thread.", "",
             "| case | gptfast (us) | PyTorch (us) | interleaved: gptfast / PyTorch (us) | "
             "PyTorch op | ratio | goal |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        goal = "" if r["goal"] is None else f"<= {r['goal']} ({'met' if r['met'] else 'MISSED'})"
        lines.append(f"| {r['case']} | {r['gptfast_us']} | {r['torch_us']} | "
                     f"{r['paired_gptfast_us']} / {r['paired_torch_us']} | {r['torch_op']} | "
                     f"{r['ratio']} | {goal} |")
    lines.append(f"| import gptfast / import torch (fresh interpreters, median of 3) | "
                 f"{imp['gptfast_s']:.2f} s | {imp['torch_s']:.2f} s | | | {imp['ratio']:.2f} | "
                 f"<= 1.3 ({'met' if imp['ratio'] <= 1.3 else 'MISSED'}) |")
    text = "\n".join(lines)
    out = Path(os.environ.get("GPTFAST_HOST_OUT") or REPO / "benchmarks" / "results" / "host")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{slug}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"{slug}.md").write_text(text + "\n")
    print("\n" + text, flush=True)
