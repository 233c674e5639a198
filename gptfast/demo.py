"""End-to-end demo: train the ``demo`` preset on the Python standard library's sources, compare the
validation loss with a unigram baseline, and sample some code.

    python -m gptfast.demo [--steps N] [--out DIR] ...   # or: gptfast demo ... / make demo

A few minutes on a 2-core CPU; on a CUDA machine the same command trains on the GPU with bf16
autocast and the fused gptfast kernels. Writes OUT/{ckpt.pt, log.json, loss.png} (default
runs/demo). Options: `gptfast demo --help`; bad values get the command line's one-line errors.
"""
from __future__ import annotations

import sys
import time
from typing import List, Optional

import torch

DEFAULTS = dict(
    preset="demo",
    block_size=128,  # shorter than the preset's 256: half the attention cost per token on a CPU
    batch_size=16,
    steps=500,  # ~1M tokens: about 2 minutes on one free CPU core
    lr=3e-3,
    warmup=30,
    max_bytes=2_000_000,  # the first ~2 MB of the stdlib (sorted paths): loads in about a second
    eval_every=100,
    eval_batches=8,
)


def run(a, device: torch.device) -> int:
    """The demo for parsed options `a` (see gptfast.cli.add_demo_arguments)."""
    t_start = time.perf_counter()
    from .generate import generate
    from .train import TrainConfig, load_model, train

    print(f"gptfast demo: device={device}" + (f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""))
    cfg = TrainConfig(
        preset=DEFAULTS["preset"],
        block_size=DEFAULTS["block_size"],
        data=None,  # the embedded corpus: this machine's Python stdlib sources
        max_bytes=DEFAULTS["max_bytes"],
        steps=a.steps,
        batch_size=a.batch_size,
        lr=DEFAULTS["lr"],
        warmup=min(DEFAULTS["warmup"], a.steps),
        eval_every=min(DEFAULTS["eval_every"], a.steps),
        eval_batches=DEFAULTS["eval_batches"],
        log_every=min(10, a.steps),
        out_dir=a.out,
        device=str(device),
        seed=a.seed,
        progress=not a.no_progress,
    )
    summary = train(cfg)

    base, val = summary["unigram_baseline"], summary["val_loss"]
    ratio = val / base
    print()
    print(f"unigram baseline  {base:.4f} nats/token  (val text under train byte frequencies)")
    print(f"model val loss    {val:.4f} nats/token  = {ratio:.2f} x baseline "
          f"({'OK' if ratio < 0.75 else 'WARNING: not well below the baseline'})")

    model, tok, _ = load_model(summary["checkpoint"], device)
    ids = tok.encode(a.prompt, bos=True)
    n_new = max(0, min(a.max_new_tokens, model.config.block_size - len(ids)))
    gen = torch.Generator(device=device).manual_seed(a.seed)
    out = generate(model, torch.tensor([ids], device=device), n_new, temperature=0.8, top_k=40,
                   eos_id=tok.EOS, generator=gen)
    new = out[0, len(ids):].tolist()
    if tok.EOS in new:
        new = new[: new.index(tok.EOS)]
    print(f"\n---- sample (prompt {a.prompt!r}, temperature 0.8, top-k 40) ----")
    print(a.prompt + tok.decode(new))
    print("----")
    print(f"wrote {a.out}/ckpt.pt, {a.out}/log.json, {a.out}/loss.png")
    print(f"demo finished in {time.perf_counter() - t_start:.1f} s")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m gptfast.demo ARGS` is `gptfast demo ARGS`."""
    from .cli import main as cli_main
    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
