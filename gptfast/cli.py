"""The ``gptfast`` command line (also ``python -m gptfast``).

    gptfast train    [--preset tiny] [--data PATH] [--out DIR] [--steps N] ... [--resume [CKPT]]
    gptfast generate --ckpt PATH --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K]
                     [--top-p P] [--greedy] [--seed S]
    gptfast info
    gptfast bench    {attention,cross-entropy,train,generate} [--quick] [extra args...]
    gptfast demo

Bad input (unknown preset, missing data path, missing or corrupt checkpoint, invalid values) is
reported as one line on stderr with exit code 2; set GPTFAST_DEBUG=1 for the traceback.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

BENCHMARKS = ("attention", "cross-entropy", "train", "generate")


class UsageError(Exception):
    """Bad user input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the usage too)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    return v


def _prob(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {s!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {s!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gptfast", description="Fused GPU kernels for GPT models, and a GPT that uses them.")
    sub = p.add_subparsers(dest="command", metavar="{train,generate,info,bench,demo}", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser("train", help="train a GPT on text (default: the Python stdlib sources)")
    t.add_argument("--preset", default="tiny", help="model preset (tiny, demo, gpt2, ...; default tiny)")
    t.add_argument("--data", default=None, help="text file or folder (default: embedded stdlib corpus)")
    t.add_argument("--max-bytes", type=_positive_int, default=None, help="cap on the text read")
    t.add_argument("--out", default="runs/default", help="output folder (ckpt.pt, log.json, loss.png)")
    t.add_argument("--steps", type=_positive_int, default=200, help="total optimizer steps")
    t.add_argument("--batch-size", type=_positive_int, default=16)
    t.add_argument("--block-size", type=_positive_int, default=None, help="context length (default: preset's)")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    t.add_argument("--min-lr", type=float, default=None, help="final learning rate (default lr/10)")
    t.add_argument("--warmup", type=_nonneg_int, default=20, help="linear warmup steps")
    t.add_argument("--decay-steps", type=_positive_int, default=None, help="cosine length (default --steps); when training a run in pieces, set it to the full length")
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per step")
    t.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm (0: off)")
    t.add_argument("--dropout", type=float, default=None, help="dropout (default: preset's)")
    t.add_argument("--eval-every", type=_nonneg_int, default=100, help="validate every N steps (0: at the end)")
    t.add_argument("--eval-batches", type=_positive_int, default=8)
    t.add_argument("--log-every", type=_positive_int, default=10)
    t.add_argument("--save-every", type=_nonneg_int, default=None, help="checkpoint every N steps (default: at each eval)")
    t.add_argument("--scheduled-sampling", type=_prob, default=0.0, metavar="P",
                   help="replace each input position by the model's prediction with probability P (0: teacher forcing)")
    t.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="resume from CKPT (default: OUT/ckpt.pt); continues bit-for-bit on CPU (same --steps/--decay-steps as the full run)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    t.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 autocast on CUDA")
    t.add_argument("--seed", type=int, default=1337)
    t.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default on CPU: the idle cores, judged by the load average)")
    t.add_argument("--no-plot", action="store_true", help="skip loss.png")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = sub.add_parser("generate", help="sample text from a checkpoint")
    g.add_argument("--ckpt", required=True, help="checkpoint file (ckpt.pt) or a run folder")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-new-tokens", type=_nonneg_int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=_positive_int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--greedy", action="store_true")
    g.add_argument("--no-cache", action="store_true", help="decode without the KV cache")
    g.add_argument("--num-samples", type=_positive_int, default=1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default="auto")

    sub.add_parser("info", help="versions, GPU and the backends each op can use")

    b = sub.add_parser("bench", help="run a benchmark script from benchmarks/")
    b.add_argument("name", choices=BENCHMARKS)
    b.add_argument("--quick", action="store_true", help="small, fast configuration")
    b.add_argument("extra", nargs=argparse.REMAINDER, help="passed on to the benchmark script")

    d = sub.add_parser("demo", help="the CPU-friendly end-to-end demo (python -m gptfast.demo)")
    d.add_argument("extra", nargs=argparse.REMAINDER)
    return p


# --------------------------------------------------------------------------------------
def _cmd_train(a) -> int:
    from .model import PRESETS
    from .train import TrainConfig, auto_threads, resolve_device, train

    if a.preset not in PRESETS:
        raise UsageError(f"--preset: unknown preset {a.preset!r} (choose from {', '.join(PRESETS)})")
    if a.data is not None and not Path(a.data).expanduser().exists():
        raise UsageError(f"--data: path not found: {a.data}")
    if a.resume is not None:
        rpath = Path(a.resume) if a.resume else Path(a.out) / "ckpt.pt"
        _check_ckpt("--resume", rpath)
    try:
        resolve_device(a.device)
    except ValueError as e:
        raise UsageError(f"--device: {e}") from None
    cfg = TrainConfig(
        preset=a.preset,
        block_size=a.block_size,
        dropout=a.dropout,
        data=a.data,
        max_bytes=a.max_bytes,
        steps=a.steps,
        batch_size=a.batch_size,
        grad_accum=a.grad_accum,
        lr=a.lr,
        min_lr=a.min_lr,
        warmup=a.warmup,
        decay_steps=a.decay_steps,
        weight_decay=a.weight_decay,
        grad_clip=a.grad_clip,
        scheduled_sampling=a.scheduled_sampling,
        eval_every=a.eval_every,
        eval_batches=a.eval_batches,
        log_every=a.log_every,
        save_every=a.save_every,
        out_dir=a.out,
        resume=a.resume,
        plot=not a.no_plot,
        progress=not a.no_progress,
        device=a.device,
        dtype=a.dtype,
        compile=a.compile,
        seed=a.seed,
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise UsageError(f"--{str(e).split(' ', 1)[0].replace('_', '-')}: {e}") from None
    import torch

    threads_before = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    elif resolve_device(a.device).type == "cpu":
        torch.set_num_threads(auto_threads())
    try:
        train(cfg)
    except ValueError as e:
        msg = str(e)
        if "corpus" in msg or "validation split" in msg or "token stream" in msg:
            raise UsageError(f"--data: {msg}") from None
        raise
    finally:
        torch.set_num_threads(threads_before)  # matters when main() is called in-process
    return 0


def _check_ckpt(arg: str, path: Path):
    from .checkpoint import CheckpointError, load_checkpoint

    if not path.exists():
        raise UsageError(f"{arg}: checkpoint not found: {path}")
    try:
        return load_checkpoint(path)
    except CheckpointError as e:
        raise UsageError(f"{arg}: {e}") from None


def _cmd_generate(a) -> int:
    import torch

    from .checkpoint import CheckpointError
    from .generate import generate
    from .train import load_model, resolve_device

    path = Path(a.ckpt)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.exists():
        raise UsageError(f"--ckpt: checkpoint not found: {a.ckpt}")
    if a.top_p is not None and not 0.0 < a.top_p <= 1.0:
        raise UsageError(f"--top-p: must be in (0, 1], got {a.top_p}")
    if a.temperature < 0:
        raise UsageError(f"--temperature: must be >= 0, got {a.temperature}")
    try:
        device = resolve_device(a.device)
    except ValueError as e:
        raise UsageError(f"--device: {e}") from None
    try:
        model, tok, _ = load_model(path, device)
    except CheckpointError as e:
        raise UsageError(f"--ckpt: {e}") from None
    ids = tok.encode(a.prompt, bos=True)
    block = model.config.block_size
    if len(ids) >= block:
        raise UsageError(f"--prompt: {len(ids)} tokens, but the model's context is {block} tokens")
    n_new = min(a.max_new_tokens, block - len(ids))
    if n_new < a.max_new_tokens:
        print(f"gptfast: note: --max-new-tokens reduced to {n_new} (context is {block} tokens)", file=sys.stderr)
    gen = None
    if a.seed is not None:
        torch.manual_seed(a.seed)
        gen = torch.Generator(device=device).manual_seed(a.seed)
    idx = torch.tensor([ids] * a.num_samples, dtype=torch.long, device=device)
    out = generate(
        model,
        idx,
        n_new,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        greedy=a.greedy,
        eos_id=tok.EOS,
        use_cache=not a.no_cache,
        generator=gen,
    )
    for i, row in enumerate(out.tolist()):
        new = row[len(ids):]
        if tok.EOS in new:
            new = new[: new.index(tok.EOS)]
        if a.num_samples > 1:
            print(f"---- sample {i + 1} ----")
        print(a.prompt + tok.decode(new))
    return 0


def _cmd_info(a) -> int:
    from gptfast.ops import backends

    print(backends.report())
    return 0


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _cmd_bench(a) -> int:
    script = _repo_root() / "benchmarks" / f"bench_{a.name.replace('-', '_')}.py"
    if not script.is_file():
        raise UsageError(
            f"bench {a.name}: benchmark script not found: {script} "
            f"(benchmarks run from a source checkout of gptfast)"
        )
    extra = [x for x in a.extra if x != "--"]
    cmd = [sys.executable, str(script)] + (["--quick"] if a.quick else []) + extra
    return subprocess.call(cmd, cwd=str(_repo_root()))


def _cmd_demo(a) -> int:
    from .demo import main as demo_main

    return demo_main(a.extra)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "train": _cmd_train,
        "generate": _cmd_generate,
        "info": _cmd_info,
        "bench": _cmd_bench,
        "demo": _cmd_demo,
    }
    debug = os.environ.get("GPTFAST_DEBUG", "") not in ("", "0")
    from .checkpoint import CheckpointError

    try:
        return handlers[args.command](args) or 0
    except UsageError as e:
        if debug:
            raise
        print(f"gptfast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        # remaining bad-input errors raised while loading data/configs (e.g. an empty corpus)
        if debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"gptfast {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptfast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
