"""The ``gptfast`` command line (also ``python -m gptfast``).

    gptfast train    [--preset tiny] [--data PATH] [--out DIR] [--steps N] ... [--resume [CKPT]]
    gptfast generate --ckpt PATH | --hf FOLDER --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K]
                     [--top-p P] [--greedy] [--num-beams N [--length-penalty L]] [--seed S]
    gptfast finetune --ckpt PATH --data FILE.csv|.jsonl [--text-column C] [--label-column C]
                     [--pooling last|mean|max] [--epochs N] [--out DIR] ...
    gptfast info     [--preset NAME] [--device D]
    gptfast bench    {attention,cross-entropy,train,generate,cpu} [--quick] [--tiny] [--out DIR]
    gptfast demo     [--steps N] [--out DIR] ...          (the same as python -m gptfast.demo)

`gptfast <command> --help` lists every option. Exit status: 0 done; 2 bad input (unknown
preset, missing data or checkpoint, a number out of range, a step that cannot fit in memory),
reported as one line on stderr naming the option; 3 a run that diverged (a loss that is not
finite: the last good checkpoint is kept); 130 interrupted. GPTFAST_DEBUG=1 shows the
traceback instead.

Options are grouped by what they act on (model, data, optimization, checkpoints, system), so
that later options have a place: a tokenizer for --data, a Hugging Face checkpoint to start
from, a parallel mode under torchrun.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Optional

BENCHMARKS = ("attention", "cross-entropy", "train", "generate", "cpu")
EXIT_USAGE, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


class UsageError(Exception):
    """Bad user input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the usage too)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_USAGE)


# ---- number types: every number an option takes is checked here ------------------------------

def integer(lo: int = 1, hi: Optional[int] = None) -> Callable[[str], int]:
    what = f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v
    parse.__name__ = "integer"
    return parse


def number(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
           hi_open: bool = False) -> Callable[[str], float]:
    """A finite float in the given interval (NaN and inf are always refused)."""
    if lo == -math.inf and hi == math.inf:
        what = "a finite number"
    elif hi == math.inf:
        what = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    else:
        what = (f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}"
                f"{')' if hi_open else ']'}")

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        ok = (math.isfinite(v) and (v > lo if lo_open else v >= lo)
              and (v < hi if hi_open else v <= hi))
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v
    parse.__name__ = "number"
    return parse


POSITIVE = integer(1)
COUNT = integer(0)
SEED = integer(0, 2**63 - 1)
PROBABILITY = number(0.0, 1.0)
DROPOUT = number(0.0, 1.0, hi_open=True)


# ---- the parser --------------------------------------------------------------------------------

def _add_system(g, *, threads: bool = True, seed: Optional[int] = 1337) -> None:
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--seed", type=SEED, default=seed,
                   help=f"random seed (default {'none: a different sample each time' if seed is None else seed})")
    if threads:
        g.add_argument("--threads", type=POSITIVE, default=None,
                       help="torch CPU threads (default on CPU: the idle cores, judged by the load average)")


def add_train_arguments(t: argparse.ArgumentParser) -> None:
    m = t.add_argument_group("model")
    m.add_argument("--preset", default="tiny", help="model preset (tiny, demo, gpt2, ...; default tiny)")
    m.add_argument("--block-size", type=POSITIVE, default=None, help="context length (default: preset's)")
    m.add_argument("--dropout", type=DROPOUT, default=None, help="embedding/residual dropout (default: preset's)")
    m.add_argument("--attn-dropout", type=DROPOUT, default=None,
                   help="attention-probability dropout (default: preset's; on a CPU, > 0 takes the slow reference attention)")
    d = t.add_argument_group("data")
    d.add_argument("--data", default=None, help="text file or folder (default: embedded stdlib corpus)")
    d.add_argument("--max-bytes", type=POSITIVE, default=None, help="cap on the text read")
    d.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="a Hugging Face folder's tokenizer (tokenizer.json, or vocab.json + merges.txt; "
                        "the model takes its vocabulary size) instead of bytes")
    o = t.add_argument_group("optimization")
    o.add_argument("--steps", type=POSITIVE, default=200, help="total optimizer steps")
    o.add_argument("--batch-size", type=POSITIVE, default=16)
    o.add_argument("--grad-accum", type=POSITIVE, default=1, help="micro-batches per step")
    o.add_argument("--lr", type=number(0.0, lo_open=True), default=1e-3, help="peak learning rate")
    o.add_argument("--min-lr", type=number(0.0), default=None, help="final learning rate (default lr/10)")
    o.add_argument("--warmup", type=COUNT, default=20, help="linear warmup steps")
    o.add_argument("--decay-steps", type=POSITIVE, default=None,
                   help="cosine length (default --steps); when training a run in pieces, set it to the full length")
    o.add_argument("--weight-decay", type=number(0.0), default=0.1)
    o.add_argument("--grad-clip", type=number(0.0), default=1.0, help="max grad norm (0: off)")
    o.add_argument("--scheduled-sampling", type=PROBABILITY, default=0.0, metavar="P",
                   help="replace each input position by the model's prediction with probability P (0: teacher forcing)")
    c = t.add_argument_group("evaluation and checkpoints")
    c.add_argument("--out", default="runs/default", help="output folder (ckpt.pt, log.json, loss.png)")
    c.add_argument("--eval-every", type=COUNT, default=100, help="validate every N steps (0: at the end)")
    c.add_argument("--eval-batches", type=POSITIVE, default=8)
    c.add_argument("--log-every", type=POSITIVE, default=10)
    c.add_argument("--save-every", type=COUNT, default=None, help="checkpoint every N steps (default: at each eval)")
    c.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="resume from CKPT (default: OUT/ckpt.pt); continues bit-for-bit on CPU (same --steps/--decay-steps as the full run)")
    c.add_argument("--no-plot", action="store_true", help="skip loss.png")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = t.add_argument_group("system")
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 autocast on CUDA")
    _add_system(s)


def add_generate_arguments(g: argparse.ArgumentParser) -> None:
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="checkpoint file (ckpt.pt) or a run folder")
    src.add_argument("--hf", metavar="FOLDER",
                     help="a Hugging Face GPT-2 or BLOOM folder (config.json, weights, tokenizer; needs gptfast[hf])")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-new-tokens", type=COUNT, default=200)
    s = g.add_argument_group("sampling (the default: temperature 0.8)")
    s.add_argument("--temperature", type=number(0.0), default=None, help="0: greedy (default 0.8)")
    s.add_argument("--top-k", type=POSITIVE, default=None)
    s.add_argument("--top-p", type=number(0.0, 1.0, lo_open=True), default=None)
    s.add_argument("--greedy", action="store_true")
    s.add_argument("--num-samples", type=POSITIVE, default=1)
    b = g.add_argument_group("beam search (deterministic: instead of sampling)")
    b.add_argument("--num-beams", type=POSITIVE, default=None, help="keep the N best hypotheses; prints the best")
    b.add_argument("--length-penalty", type=number(), default=None,
                   help="score = sum log p / length**L (default 1.0; > 1 favours longer texts)")
    g.add_argument("--no-cache", action="store_true", help="decode without the KV cache")
    _add_system(g, threads=False, seed=None)


def add_finetune_arguments(f: argparse.ArgumentParser) -> None:
    f.add_argument("--ckpt", required=True, help="pretrained checkpoint file or run folder")
    d = f.add_argument_group("data")
    d.add_argument("--data", required=True, help="a .csv file (header row) or a .jsonl file")
    d.add_argument("--format", default="auto", choices=["auto", "csv", "jsonl"], help="default: by extension")
    d.add_argument("--text-column", default="text")
    d.add_argument("--label-column", default="label")
    d.add_argument("--val-fraction", type=number(0.0, 1.0, lo_open=True, hi_open=True), default=0.2,
                   help="share of the examples held out for accuracy")
    d.add_argument("--max-length", type=integer(2), default=None, help="tokens per text, BOS included (default: the context)")
    m = f.add_argument_group("model and optimization")
    m.add_argument("--pooling", default="last", choices=["last", "mean", "max"])
    m.add_argument("--epochs", type=POSITIVE, default=3)
    m.add_argument("--batch-size", type=POSITIVE, default=16)
    m.add_argument("--lr", type=number(0.0, lo_open=True), default=3e-4)
    m.add_argument("--weight-decay", type=number(0.0), default=0.01)
    m.add_argument("--grad-clip", type=number(0.0), default=1.0, help="max grad norm (0: off)")
    f.add_argument("--out", default="runs/finetune", help="output folder (ckpt.pt, finetune.json)")
    _add_system(f)


def add_demo_arguments(d: argparse.ArgumentParser) -> None:
    from .demo import DEFAULTS
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=POSITIVE, default=DEFAULTS["steps"])
    d.add_argument("--batch-size", type=POSITIVE, default=DEFAULTS["batch_size"])
    d.add_argument("--prompt", default="def ")
    d.add_argument("--max-new-tokens", type=COUNT, default=200)
    d.add_argument("--no-progress", action="store_true")
    _add_system(d)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gptfast", description="Fused GPU kernels for GPT models, and a GPT that uses them.")
    names = "{train,generate,finetune,info,bench,demo}"
    sub = p.add_subparsers(dest="command", metavar=names, parser_class=_Parser)
    sub.required = True
    add_train_arguments(sub.add_parser("train", help="train a GPT on text (default: the Python stdlib sources)"))
    add_generate_arguments(sub.add_parser("generate", help="sample text (or beam-search it) from a checkpoint"))
    add_finetune_arguments(sub.add_parser("finetune", help="fine-tune a checkpoint for text classification"))
    i = sub.add_parser("info", help="versions, GPU, backends, and the path each preset's ops take")
    i.add_argument("--preset", default=None, help="explain this preset in full (training and decoding)")
    i.add_argument("--device", default="auto")
    b = sub.add_parser("bench", help="run a benchmark (installed with gptfast)")
    b.add_argument("name", choices=BENCHMARKS)
    b.add_argument("--quick", action="store_true", help="fewer points (what make gpu-check runs)")
    b.add_argument("--tiny", action="store_true", help="the test suite's tiny shapes")
    b.add_argument("--out", default=None,
                   help="output folder (default: benchmarks/results/<device>/ in a source checkout, "
                        "else ./gptfast-bench/<device>/)")
    b.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    add_demo_arguments(sub.add_parser("demo", help="the CPU-friendly end-to-end demo (train, compare, sample)"))
    return p


# ---- shared pieces ------------------------------------------------------------------------------

def _device(name: str):
    from .train import resolve_device
    try:
        return resolve_device(name)
    except ValueError as e:
        raise UsageError(f"--device: {e}") from None


def _set_threads(a, device) -> Optional[int]:
    """Set torch's CPU threads for this command; returns the previous count to restore."""
    import torch
    from .train import auto_threads
    before = torch.get_num_threads()
    if getattr(a, "threads", None):
        torch.set_num_threads(a.threads)
    elif device.type == "cpu":
        torch.set_num_threads(auto_threads())
    return before


def _checkpoint_path(arg: str, value: str) -> Path:
    from .train import resolve_checkpoint
    try:
        return resolve_checkpoint(value)
    except FileNotFoundError as e:
        raise UsageError(f"{arg}: {e}") from None


def _check_ckpt(arg: str, path: Path):
    from .checkpoint import CheckpointError, load_checkpoint

    if not path.exists():
        raise UsageError(f"{arg}: checkpoint not found: {path}")
    try:
        return load_checkpoint(path)
    except CheckpointError as e:
        raise UsageError(f"{arg}: {e}") from None


# ---- commands -----------------------------------------------------------------------------------

def _cmd_train(a) -> int:
    from .model import PRESETS
    from .train import MemoryPreflightError, TrainConfig, train

    if a.preset not in PRESETS:
        raise UsageError(f"--preset: unknown preset {a.preset!r} (choose from {', '.join(PRESETS)})")
    if a.data is not None and not Path(a.data).expanduser().exists():
        raise UsageError(f"--data: path not found: {a.data}")
    if a.tokenizer is not None:
        if a.resume is not None:
            raise UsageError("--tokenizer: a resumed run keeps its checkpoint's tokenizer; drop --tokenizer")
        _hf_tokenizer("--tokenizer", a.tokenizer)  # a bad path is a usage error before anything runs
    if a.resume is not None:
        rpath = Path(a.resume) if a.resume else Path(a.out) / "ckpt.pt"
        _check_ckpt("--resume", rpath)
    device = _device(a.device)
    cfg = TrainConfig(
        preset=a.preset, block_size=a.block_size, dropout=a.dropout, attn_dropout=a.attn_dropout,
        data=a.data, tokenizer=a.tokenizer, max_bytes=a.max_bytes, steps=a.steps, batch_size=a.batch_size,
        grad_accum=a.grad_accum, lr=a.lr, min_lr=a.min_lr, warmup=a.warmup,
        decay_steps=a.decay_steps, weight_decay=a.weight_decay, grad_clip=a.grad_clip,
        scheduled_sampling=a.scheduled_sampling, eval_every=a.eval_every,
        eval_batches=a.eval_batches, log_every=a.log_every, save_every=a.save_every,
        out_dir=a.out, resume=a.resume, plot=not a.no_plot, progress=not a.no_progress,
        device=a.device, dtype=a.dtype, compile=a.compile, seed=a.seed,
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise UsageError(f"--{str(e).split(' ', 1)[0].replace('_', '-')}: {e}") from None
    import torch

    before = _set_threads(a, device)
    try:
        train(cfg)
    except MemoryPreflightError as e:
        raise UsageError(f"--batch-size/--block-size: {e}") from None
    except ValueError as e:
        msg = str(e)
        if "corpus" in msg or "validation split" in msg or "token stream" in msg:
            raise UsageError(f"--data: {msg}") from None
        raise
    finally:
        torch.set_num_threads(before)  # matters when main() is called in-process
    return 0


def _hf_tokenizer(flag: str, path: str):
    try:
        from .hf.tokenizer import load_tokenizer
        return load_tokenizer(Path(path).expanduser())
    except ImportError as e:
        raise UsageError(f"{flag}: needs the hf extra (pip install 'gptfast[hf]'): {e}") from None
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"{flag}: {e}") from None


def _load_for_generate(a, device):
    """(model, tokenizer, prompt ids) from --ckpt or --hf."""
    from .checkpoint import CheckpointError

    if a.hf is None:
        from .train import load_model
        try:
            model, tok, _ = load_model(_checkpoint_path("--ckpt", a.ckpt), device)
        except CheckpointError as e:
            raise UsageError(f"--ckpt: {e}") from None
    else:
        tok = _hf_tokenizer("--hf", a.hf)
        try:
            from .hf.checkpoint import load_model as load_hf
            model = load_hf(Path(a.hf).expanduser(), device=device)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--hf: {e}") from None
        if tok.vocab_size > model.config.vocab_size:
            raise UsageError(f"--hf: the tokenizer has {tok.vocab_size} ids, the model "
                             f"{model.config.vocab_size}")
    if tok.kind == "byte":
        ids = tok.encode(a.prompt, bos=True)
    else:  # HF models continue the prompt's own tokens; an empty prompt starts a document
        ids = tok.encode(a.prompt)
        start = tok.bos_id if tok.bos_id is not None else tok.eos_id
        if not ids:
            if start is None:
                raise UsageError("--prompt: empty, and the tokenizer has no BOS/EOS token to start from")
            ids = [start]
    return model, tok, ids


def _cmd_generate(a) -> int:
    import torch

    from .generate import beam_search, generate

    if a.num_beams is not None:
        sampling = [f for f, v in (("--temperature", a.temperature), ("--top-k", a.top_k),
                                   ("--top-p", a.top_p), ("--greedy", a.greedy or None))
                    if v is not None]
        if sampling:
            raise UsageError(f"--num-beams: beam search does not sample; drop {', '.join(sampling)}")
        if a.num_samples != 1:
            raise UsageError("--num-beams: beam search returns the one best text; drop --num-samples")
    elif a.length_penalty is not None:
        raise UsageError("--length-penalty: only used by beam search (add --num-beams N)")
    device = _device(a.device)
    model, tok, ids = _load_for_generate(a, device)
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
    if a.num_beams is not None:
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        out, score = beam_search(model, idx, n_new, a.num_beams, eos_id=tok.eos_id,
                                 length_penalty=1.0 if a.length_penalty is None else a.length_penalty)
        rows = out.tolist()
        print(f"gptfast: beam search, {a.num_beams} beams: best score {score:.4f} "
              f"(mean log-probability per token, length penalty "
              f"{1.0 if a.length_penalty is None else a.length_penalty:g})", file=sys.stderr)
    else:
        idx = torch.tensor([ids] * a.num_samples, dtype=torch.long, device=device)
        rows = generate(model, idx, n_new, temperature=0.8 if a.temperature is None else a.temperature,
                        top_k=a.top_k, top_p=a.top_p, greedy=a.greedy, eos_id=tok.eos_id,
                        use_cache=not a.no_cache, generator=gen).tolist()
    for i, row in enumerate(rows):
        new = row[len(ids):]
        if tok.eos_id in new:
            new = new[: new.index(tok.eos_id)]
        if len(rows) > 1:
            print(f"---- sample {i + 1} ----")
        print(a.prompt + tok.decode(new))
    return 0


def _cmd_finetune(a) -> int:
    from .checkpoint import CheckpointError
    from .finetune import DataError, FinetuneConfig, finetune

    _checkpoint_path("--ckpt", a.ckpt)
    if not Path(a.data).expanduser().is_file():
        raise UsageError(f"--data: file not found: {a.data}")
    device = _device(a.device)
    cfg = FinetuneConfig(ckpt=a.ckpt, data=a.data, out_dir=a.out, text_column=a.text_column,
                         label_column=a.label_column, data_format=a.format, pooling=a.pooling,
                         val_fraction=a.val_fraction, epochs=a.epochs, batch_size=a.batch_size,
                         lr=a.lr, weight_decay=a.weight_decay, grad_clip=a.grad_clip,
                         max_length=a.max_length, device=a.device, seed=a.seed)
    import torch

    before = _set_threads(a, device)
    try:
        finetune(cfg)
    except CheckpointError as e:
        raise UsageError(f"--ckpt: {e}") from None
    except DataError as e:
        msg = str(e)
        flag = ("--text-column" if f"column {a.text_column!r}" in msg or f"field {a.text_column!r}" in msg
                else "--label-column" if (f"column {a.label_column!r}" in msg
                                          or f"field {a.label_column!r}" in msg) else "--data")
        raise UsageError(f"{flag}: {msg}") from None
    finally:
        torch.set_num_threads(before)
    return 0


def _cmd_info(a) -> int:
    from gptfast.ops import backends

    from .model import PRESETS, explain_paths
    if a.preset is not None and a.preset not in PRESETS:
        raise UsageError(f"--preset: unknown preset {a.preset!r} (choose from {', '.join(PRESETS)})")
    device = _device(a.device)
    print(backends.report())
    if a.preset is not None:
        for training in (True, False):
            print(f"\npreset {a.preset} on {device}, "
                  f"{'a training step' if training else 'decoding (no gradients)'}:")
            print(explain_paths(a.preset, device=device, training=training))
        return 0
    print(f"\nwhat each preset's training step runs on {device} "
          f"(`gptfast info --preset NAME` explains one in full):")
    rows = [("preset", "head dim", "attention", "loss")]
    for name in PRESETS:
        from .model import get_config
        paths = explain_paths(name, device=device)
        att, loss = paths["attention"], paths["linear_cross_entropy"]
        rows.append((name, str(get_config(name).head_size), _path_summary(att),
                     _path_summary(loss)))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r[:3], width)) + "  " + r[3])
    return 0


def _path_summary(decision) -> str:
    """'triton', or 'torch (SDPA CPU kernel)', with why the first kernel backend cannot."""
    if decision.backend != "torch":
        return decision.backend
    path = decision.torch_path or ""
    if path.startswith("PyTorch's fused SDPA"):
        short = "fused SDPA CPU kernel"
    elif path.startswith("the plain reference"):   # "...scores: dropout_p > 0 (why)"
        short = "reference, S x S scores: " + path.split("scores: ", 1)[-1].split(" (")[0]
    elif path.startswith("chunks"):
        short = "chunked"
    else:
        short = path
    why = next((f"{b}: {r}" for b, r in decision.reasons.items() if r and b != "torch"
                and "need CUDA tensors" not in r and "TRITON_INTERPRET" not in r), None)
    return f"torch ({short})" + (f" — {why}" if why else "")


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _bench_command(name: str) -> List[str]:
    """How to run a benchmark: the installed gptfast.benchmarks module, or (a source tree
    that is not installed) the script in benchmarks/."""
    module = f"gptfast.benchmarks.bench_{name.replace('-', '_')}"
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if found:
        return [sys.executable, "-m", module]
    script = _repo_root() / "benchmarks" / f"bench_{name.replace('-', '_')}.py"
    if script.is_file():
        return [sys.executable, str(script)]
    raise UsageError(f"bench {name}: benchmark module {module} not found (reinstall gptfast: "
                     f"pip install gptfast) and no script at {script}")


def _cmd_bench(a) -> int:
    cmd = _bench_command(a.name)
    if a.quick:
        cmd.append("--quick")
    if a.tiny:
        cmd.append("--tiny")
    if a.out is not None:
        cmd += ["--out", str(Path(a.out).expanduser().resolve())]
    cmd += ["--device", a.device]
    return subprocess.call(cmd)


def _cmd_demo(a) -> int:
    from .demo import run
    device = _device(a.device)
    import torch

    before = _set_threads(a, device)
    try:
        return run(a, device)
    finally:
        torch.set_num_threads(before)


HANDLERS = {"train": _cmd_train, "generate": _cmd_generate, "finetune": _cmd_finetune,
            "info": _cmd_info, "bench": _cmd_bench, "demo": _cmd_demo}


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    parser = build_parser()
    if prog:
        parser.prog = prog
    args = parser.parse_args(argv)
    debug = os.environ.get("GPTFAST_DEBUG", "") not in ("", "0")
    from .checkpoint import CheckpointError
    from .train import TrainingDiverged

    name = f"gptfast {args.command}"
    try:
        return HANDLERS[args.command](args) or 0
    except UsageError as e:
        if debug:
            raise
        print(f"{name}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as e:
        if debug:
            raise
        print(f"{name}: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        # remaining bad-input errors raised while loading data/configs (e.g. an empty corpus)
        if debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{name}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
