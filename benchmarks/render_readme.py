"""Regenerate the README "Performance" section from the latest benchmark results.

    python benchmarks/render_readme.py                  # newest GPU results folder, to stdout
    python benchmarks/render_readme.py --results benchmarks/results/nvidia-h200 --out FILE

It reads <results>/{attention,cross_entropy,train,generate}.json, prints the device, the commit
the numbers came from, and whether kernels/ or csrc/ changed since (their hash against the
current tree), then the main table of each benchmark and the goal table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import REPO, kernel_hash  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
ORDER = ("attention", "cross_entropy", "train", "generate")


def newest_results(root: Path = RESULTS) -> Optional[Path]:
    """The results folder with the newest JSON, GPU folders before the CPU one."""
    best = None
    for folder in (p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        stamps = [f.stat().st_mtime for f in folder.glob("*.json")]
        if stamps:
            key = (folder.name != "cpu", max(stamps))
            best = max(best, (key, folder)) if best else (key, folder)
    return best[1] if best else None


def _fmt(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _goal_rows(goals: List[dict]) -> List[str]:
    out = []
    for g in goals:
        state = {True: "met", False: "**miss**", None: "not judged"}[g["met"]]
        out.append(f"| {g['name']}{' (stretch)' if g.get('stretch') else ''} | "
                   f"{_fmt(g['measured_ratio'])} | {g['direction']} {g['target']} | {state} |")
    return out


def _attention(rec) -> List[str]:
    rows = [r for r in rec["rows"] if r["fwd_tflops"] or r["bwd_tflops"]]
    seqs = sorted({r["S"] for r in rows})
    lines = ["| peer | d | " + " | ".join(f"S={s}" for s in seqs) + " |",
             "|---|---|" + "---|" * len(seqs)]
    for peer in dict.fromkeys(r["peer"] for r in rows):
        for d in sorted({r["d"] for r in rows}, reverse=True):
            cells = []
            for s in seqs:
                r = next((x for x in rows if x["peer"] == peer and x["d"] == d and x["S"] == s), None)
                cells.append("–" if r is None else f"{_fmt(r['fwd_tflops'])} / {_fmt(r['bwd_tflops'])}")
            if any(c != "–" for c in cells):
                lines.append(f"| {peer} | {d} | " + " | ".join(cells) + " |")
    return ["Causal attention, TFLOP/s forward / backward:", ""] + lines


def _cross_entropy(rec) -> List[str]:
    lines = ["| shape | peer | ms | of roofline | peak MiB above inputs |", "|---|---|---|---|---|"]
    for r in rec["rows"]:
        mem = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20
        frac = None if r["roofline_fraction"] is None else f"{100 * r['roofline_fraction']:.0f} %"
        lines.append(f"| {r['shape']} ({r['N']}, {r['D']}, {r['V']}) | {r['peer']} | "
                     f"{_fmt(r['ms'])} | {frac or '–'} | {_fmt(mem)} |")
    return ["Linear cross-entropy, forward + backward:", ""] + lines


def _train(rec) -> List[str]:
    lines = ["| model | ms / step | tokens / s | MFU | peak GiB |", "|---|---|---|---|---|"]
    for r in rec["rows"]:
        mfu = "–" if r["mfu"] is None else f"{100 * r['mfu']:.0f} %"
        mem = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**30
        lines.append(f"| {r['peer']} | {_fmt(r['ms'])} | {_fmt(r['tokens_per_s'])} | {mfu} | "
                     f"{_fmt(mem)} |")
    return [f"Training step ({rec['config'].get('model', '')}, batch {rec['config'].get('batch')}):",
            ""] + lines


def _generate(rec) -> List[str]:
    lines = ["| model | decoder | batch | tokens / s | of roofline |", "|---|---|---|---|---|"]
    for r in rec["rows"]:
        frac = "–" if r["roofline_fraction"] is None else f"{100 * r['roofline_fraction']:.0f} %"
        lines.append(f"| {r['preset']} | {r['peer']} | {r['batch']} | {_fmt(r['tokens_per_s'])} "
                     f"| {frac} |")
    return ["Decoding:", ""] + lines


RENDER = {"attention": _attention, "cross_entropy": _cross_entropy, "train": _train,
          "generate": _generate}


def render(folder: Path) -> str:
    recs = {n: json.loads((folder / f"{n}.json").read_text())
            for n in ORDER if (folder / f"{n}.json").exists()}
    if not recs:
        return f"## Performance\n\nNo results in {folder}.\n"
    first = next(iter(recs.values()))
    now = kernel_hash()
    hashes = {r["kernel_hash"] for r in recs.values()}
    changed = ("no: these numbers measure the current kernels" if hashes == {now} else
               f"**yes**: measured with kernels {', '.join(sorted(hashes))}, the tree now has "
               f"{now}; rerun `make gpu-check` or the benchmarks")
    quick = any(r["quick"] for r in recs.values())
    c = first["ceilings"]
    out = ["## Performance", "",
           f"Device: {first['device']}; torch {first['versions']['torch']}, triton "
           f"{first['versions'].get('triton')}; commit `{first['git']['commit'][:10]}`"
           f"{' (uncommitted changes)' if first['git'].get('dirty') else ''}; "
           f"{first['created']}{'; quick mode' if quick else ''}.",
           f"Kernels changed since: {changed}.",
           f"Ceilings measured in the same run: {c['matmul']} matmul {c['matmul_tflops']:.3g} "
           f"TFLOP/s, copy {c['copy_TBps']:.2f} TB/s. Timings: {first['timer']}.", ""]
    goals = []
    for name, rec in recs.items():
        out += RENDER[name](rec) + [""]
        goals += rec["goals"]
        if rec["missing_peers"]:
            out += ["Missing peers: " + "; ".join(f"{m['peer']} ({m['reason']})"
                                                  for m in rec["missing_peers"]), ""]
    if goals:
        out += ["Goals:", "", "| goal | measured | target | state |", "|---|---|---|---|"]
        out += _goal_rows(goals) + [""]
    out.append(f"Regenerate: `python benchmarks/render_readme.py --results "
               f"{folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder}`.")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=None, help="results folder (default: the newest)")
    p.add_argument("--out", default=None, help="write here instead of stdout")
    a = p.parse_args(argv)
    folder = Path(a.results) if a.results else newest_results()
    if folder is None:
        print(f"render_readme: no results under {RESULTS}", file=sys.stderr)
        return 2
    text = render(folder.resolve())
    if a.out:
        Path(a.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
