"""Tune the attention kernels in one command: time a Hopper-aware list of candidate
configurations for each configuration key and write the winners into the table the kernels
read (`kernels/attention_configs.json`, data, not code).

    python benchmarks/tune_attention.py                 # on a GPU: <= 4 min, writes the table
    python benchmarks/tune_attention.py --quick         # <= 60 s (what `make gpu-check` runs)
    python benchmarks/tune_attention.py --out tuned.json --report tune.json
    python benchmarks/tune_attention.py --dry-run --out /tmp/t.json   # CPU: the whole pipeline

Keys: the configuration key of kernels/configs.py (kind, this GPU's arch, dtype, padded head
dim, feature flags, Sq/Sk power-of-two buckets) of the benchmark's training shapes (causal,
bf16, hidden 2048 so H = 2048 / d, 16k tokens per batch so B = 16384 / S): the forward ("fwd"),
the backward with atomic dQ ("bwd") and the deterministic backward ("bwd" + deterministic).
Candidates: `attention.tuning_candidates` (the committed config first, then Hopper-shaped
tiles, pointer loads, TMA, TMA with warp specialization; `keep` filters what cannot fit or
wastes wgmma). Each candidate is compiled and run through the real launchers
(`attention.config_override`), checked against the committed config's results (a candidate
that compiles into wrong numbers is rejected, not timed), and timed with
`triton.testing.do_bench` (median). The fastest becomes an "exact" entry for its key (it
applies to exactly that feature set and bucket; the rest of the table is kept), the table is
validated and written in the committed layout. Keys are tuned most important first, and the
run stops starting new ones when --budget runs out, so it always ends with a valid table.

After a GPU run, `GPTFAST_ATTENTION_CONFIGS=<out>` makes a process use the tuned table
(`make gpu-check` does this for the benchmarks after its tuning stage); commit the file as
kernels/attention_configs.json to make it the default.

--dry-run (any machine, no GPU): the same pipeline under the Triton interpreter at a tiny
shape, candidates for sm_90, wall-clock "timings" that mean nothing; it proves the pipeline
(keys, candidates, overrides, the correctness check, the merge, validation, the file).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

if __name__ == "__main__" and "--dry-run" in sys.argv and not os.environ.get("TRITON_INTERPRET"):
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from gptfast.kernels import attention as A  # noqa: E402
from gptfast.kernels import configs as C  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
HIDDEN, TOKENS = 2048, 16384  # the benchmark's shapes (benchmarks/bench_attention.py)


def plan(dims: List[int], seqlens: List[int], dtypes: List[str], modes: List[str]) -> List[dict]:
    """The keys to tune, most important first: per sequence length (in the given order), per
    head dim, the forward, then the backward, then the deterministic backward."""
    out = []
    for S in seqlens:
        for d in dims:
            for dt in dtypes:
                for mode in modes:
                    out.append(dict(S=S, d=d, dtype=dt, mode=mode))
    return out


def key_of(job: dict, table: C.Table, target: C.Target) -> C.ConfigKey:
    kind = "fwd" if job["mode"] == "fwd" else "bwd"
    feats = ("causal",) + (("deterministic",) if job["mode"] == "bwd-det" else ())
    return table.key(kind, target, DTYPES[job["dtype"]], job["d"], feats, (job["S"], job["S"]))


def shape_of(job: dict, dry_run: bool) -> Tuple[int, int, int, int]:
    if dry_run:
        return 1, 1, 128, job["d"]
    d, S = job["d"], job["S"]
    return max(1, TOKENS // S), max(1, HIDDEN // d), S, d


class Inputs:
    """Random q, k, v, dO of one key's shape, and the committed config's results."""

    def __init__(self, job: dict, device: torch.device, dry_run: bool):
        B, H, S, d = shape_of(job, dry_run)
        dtype = DTYPES[job["dtype"]] if not dry_run else torch.float32
        g = torch.Generator(device="cpu").manual_seed(S * 1000 + d)
        self.q, self.k, self.v, self.do = (torch.randn(B, H, S, d, generator=g).to(device, dtype)
                                           for _ in range(4))
        self.scale = d ** -0.5
        self.mode = job["mode"]
        self.out, self.lse = A.attention_forward(self.q, self.k, self.v, causal=True,
                                                 softmax_scale=self.scale)

    def forward(self):
        return A.attention_forward(self.q, self.k, self.v, causal=True, softmax_scale=self.scale)

    def backward(self):
        return A.attention_backward(self.do, self.q, self.k, self.v, self.out, self.lse,
                                    causal=True, softmax_scale=self.scale,
                                    deterministic=self.mode == "bwd-det")

    def run(self):
        return self.forward() if self.mode == "fwd" else self.backward()


def _close(got, want, dtype) -> Optional[str]:
    """None when a candidate's results match the committed config's, else why not. Tiles
    change the order of the fp32 sums only: a few units of the output dtype's rounding."""
    tol = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
    for name, g, w in zip(("out/dq", "lse/dk", "dv"), got, want):
        finite = torch.isfinite(w)
        if not torch.equal(torch.isfinite(g), finite):
            return f"{name}: non-finite values where the committed config has none"
        err = (g.float() - w.float())[finite].abs().max().item() if finite.any() else 0.0
        scale = max(1.0, w.float()[finite].abs().max().item() if finite.any() else 1.0)
        if err > tol * scale:
            return f"{name}: max |diff| {err:.3g} against the committed config"
    return None


def tune_key(job: dict, inputs: Inputs, table: C.Table, target: C.Target, timer,
             max_candidates: int, device: torch.device) -> dict:
    key = key_of(job, table, target)
    kind = key.kind
    baseline = table.lookup(key)
    dtype = inputs.q.dtype
    cands = A.tuning_candidates(kind, job["d"], DTYPES[job["dtype"]], target.capability,
                                key.features, baseline, limit=max_candidates)
    want = inputs.run()
    rec = {"key": key.describe(), "shape": list(inputs.q.shape), "committed": baseline.kwargs(),
           "candidates": []}
    best = None
    for cfg in cands:
        params = cfg._asdict()
        if kind == "bwd":
            params.pop("WARP_SPECIALIZE")
        row = {"config": params, "ms": None, "error": None}
        try:
            with A.config_override(**{kind: params}):
                got = inputs.run()
                why = _close(got, want, dtype)
                if why:
                    row["error"] = f"wrong results: {why}"
                else:
                    row["ms"] = timer(inputs.run)
        except Exception as e:  # noqa: BLE001 - a candidate that does not compile is skipped
            row["error"] = harness.error_text(e)
        rec["candidates"].append(row)
        if row["ms"] is not None and (best is None or row["ms"] < best["ms"]):
            best = row
        print(f"  {key.describe():60s} {_cfg_text(params):28s} "
              + (f"{row['ms']:.3f} ms" if row["ms"] is not None else f"-- {row['error'][:90]}"),
              flush=True)
    rec["best"] = best
    if best is not None:
        base_ms = rec["candidates"][0]["ms"]
        why = (f"tuned by benchmarks/tune_attention.py on {device_name(device)} "
               f"{datetime.date.today().isoformat()}, B,H,S,d={','.join(map(str, inputs.q.shape))}: "
               f"{best['ms']:.3f} ms" + (f" (committed config {base_ms:.3f} ms)" if base_ms else ""))
        rec["entry"] = C.entry_for(key, table, best["config"], why, exact=True)
    return rec


def _cfg_text(p: dict) -> str:
    return (f"{p['BLOCK_M']}x{p['BLOCK_N']} w{p['num_warps']} s{p['num_stages']}"
            + (" TMA" if p.get("USE_TMA") else "") + (" WS" if p.get("WARP_SPECIALIZE") else ""))


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU interpreter (dry run)"


def merge(data: dict, entries: List[dict]) -> dict:
    """The table `data` with `entries` added, replacing earlier exact entries for the same key;
    an arch that had no entries of a kind gets a copy of the "default" ones first, so keys the
    run did not tune still find an entry."""
    data = json.loads(json.dumps(data))
    ident = ("kind", "arch", "dtype", "dim", "features", "lengths")

    def same(a, b):
        return a.get("exact") and all(a.get(f) == b.get(f) for f in ident)

    for e in entries:
        kind, arch = e["kind"], e["arch"]
        if not any(x["kind"] == kind and x["arch"] == arch for x in data["entries"]):
            for x in [x for x in data["entries"] if x["kind"] == kind and x["arch"] == "default"]:
                data["entries"].append(dict(x, arch=arch, why=f"copied from default for {arch} "
                                            f"(tune_attention.py): {x.get('why', '')}"))
        data["entries"] = [x for x in data["entries"] if not same(x, e)] + [e]
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="<= 60 s: d=128, S 2k and 8k, 4 candidates")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: the pipeline under the Triton interpreter at a tiny shape")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds; no new key starts after it (default 210, --quick 40: a key "
                         "started just before takes up to ~20 s more)")
    ap.add_argument("--dims", type=int, nargs="+", default=None, help="head dims (default 128 64)")
    ap.add_argument("--seqlens", type=int, nargs="+", default=None,
                    help="sequence lengths, most important first (default 4096 2048 8192 1024 16384)")
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16"])
    ap.add_argument("--modes", nargs="+", choices=["fwd", "bwd", "bwd-det"],
                    default=["fwd", "bwd", "bwd-det"])
    ap.add_argument("--max-candidates", type=int, default=None,
                    help="per key, the committed config included (default 8, --quick 4)")
    ap.add_argument("--base", type=Path, default=None,
                    help="the table to start from (default: the one the kernels read now)")
    ap.add_argument("--out", type=Path, default=None,
                    help="where to write the tuned table (default: kernels/attention_configs.json "
                         "on a GPU; required with --dry-run)")
    ap.add_argument("--report", type=Path, default=None, help="JSON with every timing")
    args = ap.parse_args(argv)

    dry = args.dry_run
    if dry and args.out is None:
        ap.error("--out: a dry run writes its table elsewhere, never over the committed one")
    if not dry and not torch.cuda.is_available():
        ap.error("tuning times kernels on a GPU: no CUDA device here (--dry-run runs the "
                 "pipeline on the CPU)")
    quick = args.quick
    budget = args.budget if args.budget is not None else (40.0 if quick else 210.0)
    dims = args.dims or ([128] if quick or dry else [128, 64])
    seqlens = args.seqlens or ([2048, 8192] if quick else [4096, 2048, 8192, 1024, 16384])
    if dry:
        seqlens = seqlens[:1]
    max_c = args.max_candidates or (4 if quick or dry else 8)
    device = torch.device("cuda" if not dry else "cpu")
    target = C.Target((9, 0), 132) if dry else C.launch_target(device)
    base_path = args.base or C.table_path("attention")
    data = json.loads(Path(base_path).read_text())
    table = C.Table(Path(base_path).name, data)
    out_path = args.out or (Path(A.__file__).resolve().parent / "attention_configs.json")

    def timer(fn):
        if dry:  # meaningless but measured: one interpreted call
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))

    jobs = plan(dims, seqlens, args.dtypes, args.modes)
    print(f"tune_attention: {len(jobs)} keys on {device_name(device)} ({target.arch}), "
          f"budget {budget:.0f} s, up to {max_c} candidates each", flush=True)
    t0 = time.monotonic()
    records, entries = [], []
    for job in jobs:
        if time.monotonic() - t0 > budget:
            records.append({"key": key_of(job, table, target).describe(),
                            "skipped": "budget spent"})
            continue
        inputs = Inputs(job, device, dry)
        rec = tune_key(job, inputs, table, target, timer, max_c, device)
        records.append(rec)
        if "entry" in rec:
            entries.append(rec["entry"])
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    tuned = merge(data, entries)
    problems = C.Table(out_path.name, tuned).validate()
    if problems:
        print("tune_attention: the tuned table does not validate:\n" + "\n".join(problems[:20]))
        return 1
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(C.dump_table(tuned))
    seconds = round(time.monotonic() - t0, 1)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(
            {"device": device_name(device), "arch": target.arch, "dry_run": dry,
             "seconds": seconds, "budget_s": budget, "table": str(out_path),
             "versions": harness.versions(), "keys": records}, indent=1) + "\n")
    done = sum(1 for r in records if "entry" in r)
    print(f"tune_attention: {done}/{len(jobs)} keys tuned in {seconds} s; wrote {out_path}"
          + (f" and {args.report}" if args.report else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
