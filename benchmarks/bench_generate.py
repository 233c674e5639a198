"""Decoding speed of gptfast.generate (static KV cache) against the memory-bandwidth roofline.

GPT-2 (124M) and GPT-2 XL (1.5B) with random weights in bf16, batch 1 and 8, greedy decoding.
Decode time per step = (time of a generate of n new tokens - time of a generate of 1 new token)
/ (n - 1), so the prompt's prefill is left out. tokens/s = batch / decode time per step.
Roofline: each step reads every weight once, so a step takes at least
weight bytes / copy bandwidth (measured in this run, read + write); at batch b the roofline
is b times that many tokens/s (the KV cache reads are left out: small at these lengths).

    python benchmarks/bench_generate.py [--quick] [--tiny] [--out DIR]

The CPU run: the tiny preset in float32, with and without the KV cache.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def setup(run: harness.Run) -> dict:
    if run.is_cuda:
        return dict(presets=["gpt2", "gpt2-xl"], batches=[1, 8], prompt=32,
                    new=32 if run.quick else 128, dtype=torch.bfloat16, cache_modes=[True])
    if run.tiny:
        return dict(presets=["tiny"], batches=[1], prompt=8, new=8, dtype=torch.float32,
                    cache_modes=[True, False])
    return dict(presets=["tiny"], batches=[1, 4], prompt=16, new=48, dtype=torch.float32,
                cache_modes=[True, False])


def measure(run: harness.Run, model, preset: str, batch: int, s: dict, use_cache: bool) -> dict:
    from gptfast.generate import generate
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    row = dict(peer=f"gptfast generate ({'KV cache' if use_cache else 'no cache'})",
               preset=preset, batch=batch, use_cache=use_cache, prompt=s["prompt"],
               new_tokens=s["new"], weight_bytes=weight_bytes, step_ms=None,
               tokens_per_s=None, roofline_tokens_per_s=None, roofline_fraction=None,
               error=None)
    gen = torch.Generator(device=run.device).manual_seed(batch)
    idx = torch.randint(0, model.config.vocab_size, (batch, s["prompt"]), device=run.device,
                        generator=gen)
    try:
        t_one = run.time_ms(lambda: generate(model, idx, 1, greedy=True, use_cache=use_cache))
        t_all = run.time_ms(lambda: generate(model, idx, s["new"], greedy=True,
                                             use_cache=use_cache))
        row["step_ms"] = max(t_all - t_one, 1e-9) / (s["new"] - 1)
        row["tokens_per_s"] = batch / (row["step_ms"] * 1e-3)
        roofline_step_s = weight_bytes / (run.ceilings["copy_TBps"] * 1e12)
        row["roofline_tokens_per_s"] = batch / roofline_step_s
        row["roofline_fraction"] = row["tokens_per_s"] / row["roofline_tokens_per_s"]
    except Exception as e:  # noqa: BLE001 - a failing point is a row with its error
        row["error"] = "out of memory" if harness.is_oom(e) else harness.error_text(e)
    return row


def table(rows: List[dict]) -> str:
    body = [[r["preset"], r["peer"], r["batch"], r["weight_bytes"] / harness.MiB, r["step_ms"],
             r["tokens_per_s"], r["roofline_tokens_per_s"],
             None if r["roofline_fraction"] is None else 100 * r["roofline_fraction"],
             r["error"] or ""] for r in rows]
    return harness.md_table(["model", "decoder", "batch", "weights MiB", "ms/step", "tokens/s",
                             "roofline tokens/s", "% of roofline", "error"], body)


def plot(rows: List[dict], title: str):
    def make(out_dir: Path) -> List[Path]:
        import matplotlib.pyplot as plt
        ok = [r for r in rows if r["tokens_per_s"] is not None]
        labels = [f"{r['preset']} b={r['batch']}" + ("" if r["use_cache"] else " no-cache")
                  for r in ok]
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(ok)), 4))
        xs = range(len(ok))
        ax.bar([x - 0.2 for x in xs], [r["tokens_per_s"] for r in ok], 0.4, label="measured")
        ax.bar([x + 0.2 for x in xs], [r["roofline_tokens_per_s"] for r in ok], 0.4,
               label="bandwidth roofline")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("decode tokens / s")
        ax.legend()
        ax.grid(alpha=0.3, axis="y")
        ax.set_title(title)
        return harness.save_figure(fig, out_dir / "generate_tokens_per_s.png")
    return make


def main(argv=None) -> int:
    from gptfast.model import GPT, get_config
    run = harness.start("generate", argv)
    s = setup(run)
    run.config = {"presets": s["presets"], "batches": s["batches"], "prompt": s["prompt"],
                  "new_tokens": s["new"], "dtype": str(s["dtype"]), "weights": "random",
                  "decode": "greedy; (t(n new) - t(1 new)) / (n - 1) per step",
                  "roofline": "batch * copy bandwidth / weight bytes tokens/s"}
    for preset in s["presets"]:
        torch.manual_seed(0)
        model = GPT(get_config(preset, dropout=0.0, attn_dropout=0.0))
        model = model.to(device=run.device, dtype=s["dtype"]).eval()
        for use_cache in s["cache_modes"]:
            for batch in s["batches"]:
                row = run.add_row(**measure(run, model, preset, batch, s, use_cache))
                print(f"  {preset:8s} b={batch} {row['peer']:28s} "
                      + ("–" if row["tokens_per_s"] is None else
                         f"{row['tokens_per_s']:.4g} tok/s "
                         f"({100 * row['roofline_fraction']:.0f}% of roofline)")
                      + f" {row['error'] or ''}", flush=True)
        del model
        run.empty_cache()
    run.mark_failed_peers_missing()
    run.goals = []   # the generation issue sets no ratio goal; the roofline fraction is the measure
    run.finish(table(run.rows), plot(run.rows, f"decoding, {run.slug}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
