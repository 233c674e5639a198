#!/usr/bin/env python3
"""Resource table of the CUDA C++ kernels, without a GPU: registers, spills, stack, static and
dynamic shared memory and block size of every kernel in csrc/, for sm_80 and sm_90a.

Each kernel source is compiled alone with nvcc (`-cubin -Xptxas -v`, the optimization flags and
defines of the real build in setup.py); ptxas reports registers, spills, stack and static shared
memory. Dynamic shared memory and block sizes come from the launchers themselves (the binding's
`kernel_launches()`, read from the CPU execution layer's module, compiled from the same sources).

    python scripts/cuda_resources.py [--archs 80,90a] [--out benchmarks/results/static] [--check]

Writes cuda_resources.md and cuda_resources.json into --out (beside the Triton kernels' table).
--check exits 1 when a kernel spills or asks for more shared memory than its arch allows.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"
OUT = REPO / "benchmarks" / "results" / "static"
# sm_80 / sm_90 shared memory per block with opt-in (csrc/common/launch.h).
SMEM_LIMIT = {"80": 163 * 1024, "90a": 227 * 1024}


def kernel_sources() -> List[Path]:
    """The .cu files setup.py builds into gptfast._C (the CPU layer's own checks excluded)."""
    return sorted(p for p in CSRC.rglob("*.cu") if "sim" not in p.relative_to(CSRC).parts)


def nvcc_flags(arch: str) -> List[str]:
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    return [*COMMON_NVCC_FLAGS, "-O3", "-std=c++17", f"-arch=sm_{arch}", "-cubin",
            "-Xptxas=-v", f"-I{CSRC}"]


ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")


def demangle(names: List[str]) -> Dict[str, str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out))


def parse_ptxas(text: str) -> List[dict]:
    rows, cur = [], None
    for line in text.splitlines():
        m = ENTRY.search(line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2)}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = FRAME.search(line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                       spill_loads=int(m.group(3)))
        m = USED.search(line)
        if m:
            cur.update(registers=int(m.group(1)), barriers=int(m.group(2) or 0),
                       static_smem=int(m.group(3) or 0))
    return rows


def function_and_dtype(demangled: str):
    """('row_fwd_kernel', 'bf16') from 'void gf::ce::(anonymous namespace)::row_fwd_kernel<__nv_bfloat16>(...)'."""
    m = re.search(r"(\w+)(?:<([^>]*)>)?\(", demangled)
    name, targ = (m.group(1), m.group(2) or "") if m else (demangled, "")
    # Template arguments: the dtype, then (attention) the head dim: "bf16, d=128".
    names = {"__nv_bfloat16": "bf16", "__half": "fp16", "float": "fp32"}
    parts = [p.strip() for p in targ.split(",")] if targ.strip() else []
    dtype = ", ".join([names.get(parts[0], parts[0])] + [f"d={p}" for p in parts[1:]]) if parts else ""
    return name, dtype


def launches() -> Dict[str, dict]:
    from gptfast import cuda_sim  # built from the same sources, and kept current by ninja
    # keyed by (function, head dim): attention kernels launch differently per head dim
    return {(d["function"], d.get("head_dim")): dict(d) for d in cuda_sim.load().kernel_launches()}


def collect(archs: List[str]) -> dict:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise SystemExit("cuda_resources.py: nvcc not found")
    rows = []
    t0 = time.monotonic()
    for src in kernel_sources():
        for arch in archs:
            proc = subprocess.run([nvcc, *nvcc_flags(arch), str(src), "-o", "/dev/null"],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"nvcc failed on {src} for sm_{arch}:\n{proc.stderr[-4000:]}")
            for r in parse_ptxas(proc.stdout + proc.stderr):
                r["source"] = src.relative_to(REPO).as_posix()
                rows.append(r)
    names = demangle([r["mangled"] for r in rows])
    meta = launches()
    for r in rows:
        r["function"], r["dtype"] = function_and_dtype(names[r.pop("mangled")])
        head_dim = re.search(r"d=(\d+)", r["dtype"])
        m = meta.get((r["function"], int(head_dim.group(1)) if head_dim else None), {})
        r["launch"] = m.get("launch", "(test kernel)")
        r["threads"] = m.get("threads")
        r["dynamic_smem"] = m.get("dynamic_smem")
        r["arch"] = r["arch"].replace("sm_", "")
    rows.sort(key=lambda r: (r["source"], r["launch"], r["function"], r["dtype"], r["arch"]))
    import torch
    return {"generated": time.strftime("%Y-%m-%d"), "nvcc": subprocess.run(
                [nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1],
            "torch": torch.__version__, "seconds": round(time.monotonic() - t0, 1),
            "flags": nvcc_flags("XX"), "kernels": rows}


def problems(table: dict) -> List[str]:
    out = []
    for r in table["kernels"]:
        where = f"{r['function']}<{r['dtype']}> sm_{r['arch']}"
        if r.get("spill_stores") or r.get("spill_loads"):
            out.append(f"{where}: spills {r['spill_stores']} / {r['spill_loads']} bytes")
        smem = (r.get("static_smem") or 0) + (r.get("dynamic_smem") or 0)
        limit = SMEM_LIMIT.get(r["arch"])
        if limit and smem > limit:
            out.append(f"{where}: {smem} bytes of shared memory > {limit}")
    return out


def markdown(table: dict) -> str:
    lines = ["# CUDA C++ kernels: resources per kernel (ptxas -v)", "",
             f"Generated by `python scripts/cuda_resources.py` on {table['generated']} (nvcc "
             f"{table['nvcc']}, torch {table['torch']}); each source compiled alone with the "
             "build's flags. Dynamic shared memory and threads per block are the launchers' "
             "(row kernels: the largest block of csrc/cross_entropy/configs.h).", "",
             "| source | launch | kernel | dtype | arch | threads | registers | spill st/ld (B) "
             "| stack (B) | static smem (B) | dynamic smem (B) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table["kernels"]:
        lines.append(f"| {r['source']} | {r['launch']} | {r['function']} | {r['dtype'] or '-'} | "
                     f"sm_{r['arch']} | {r['threads'] or '-'} | {r['registers']} | "
                     f"{r['spill_stores']} / {r['spill_loads']} | {r['stack']} | "
                     f"{r['static_smem']} | {r['dynamic_smem'] if r['dynamic_smem'] is not None else '-'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default="80,90a")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    table = collect([a.strip() for a in args.archs.split(",") if a.strip()])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_resources.json").write_text(json.dumps(table, indent=1) + "\n")
    (out / "cuda_resources.md").write_text(markdown(table))
    print(markdown(table))
    bad = problems(table)
    for b in bad:
        print("PROBLEM:", b)
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
