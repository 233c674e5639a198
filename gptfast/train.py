"""Training loop: AdamW + warmup/cosine LR, clipping, accumulation, bf16 autocast on GPU,
periodic validation, scheduled sampling, atomic checkpoints with bit-for-bit resume, and
data-parallel (DDP) or fully sharded (FSDP2) training under torchrun (gptfast.distributed).

    cfg = TrainConfig(preset="tiny", steps=200, out_dir="runs/tiny")
    summary = train(cfg)            # prints a progress bar and a summary, returns a dict

Outputs in ``cfg.out_dir``: ``ckpt.pt`` (see gptfast.checkpoint; under FSDP it points to a
``ckpt-<step>.dcp/`` folder of shards), ``log.json`` (history + configs + summary) and
``loss.png`` (the loss curves).

The same run on any number of processes: ``batch_size`` is the global micro-batch (each of W
processes takes B/W rows of it), the data are ordered by global sample index (every process
draws the same window starts and reads its rows), and the embedding/residual dropout and
scheduled sampling draw from the rows' keys (gptfast.randomness), so W processes follow the
one-process run up to float rounding, and a run resumed on another W continues it. The
attention dropout alone depends on the layout (reproducible for a given W).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .data import (BatchSampler, ByteTokenizer, fixed_batches, get_tokenizer, load_corpus,
                   tokenizer_state, unigram_baseline)
from .distributed import DistContext

__all__ = [
    "TrainConfig",
    "train",
    "get_lr",
    "resolve_device",
    "auto_threads",
    "build_optimizer",
    "flops_per_token",
    "peak_flops",
    "load_model",
    "load_any",
    "resolve_checkpoint",
    "TrainingDiverged",
    "ResumeMismatch",
    "MemoryPreflightError",
    "estimate_step_memory",
    "memory_preflight",
    "PEAK_BF16_FLOPS",
]

CKPT_NAME = "ckpt.pt"


@dataclass
class TrainConfig:
    # model
    preset: str = "tiny"
    block_size: Optional[int] = None  # None: the preset's context length
    dropout: Optional[float] = None  # None: the preset's dropout
    attn_dropout: Optional[float] = None  # None: the preset's attention dropout
    model_overrides: Dict[str, Any] = field(default_factory=dict)  # any other GPTConfig field
    # data
    data: Optional[str] = None  # None: the embedded stdlib corpus; else a text file or folder
    tokenizer: Optional[str] = None  # None: bytes; else a Hugging Face folder or tokenizer.json
    max_bytes: Optional[int] = None  # cap on the text read (None: everything)
    val_fraction: float = 0.05
    # optimization
    steps: int = 200  # total optimizer steps (a resumed run continues up to this many)
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: Optional[float] = None  # None: lr / 10
    warmup: int = 20
    decay_steps: Optional[int] = None  # cosine length; None: steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    scheduled_sampling: float = 0.0  # per-position replacement probability; 0 = teacher forcing
    # evaluation / logging / checkpoints
    eval_every: int = 100  # 0: only at the end
    eval_batches: int = 8
    log_every: int = 10  # how often the history records the mean train loss
    save_every: Optional[int] = None  # None: at every evaluation and at the end
    out_dir: str = "runs/default"
    resume: Union[bool, str, None] = None  # True / "": out_dir/ckpt.pt; a str: that checkpoint
    plot: bool = True
    progress: bool = True  # tqdm bar
    verbose: bool = True  # print the header and the summary
    # system
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: bf16 autocast on cuda, fp32 on cpu; or "fp32" / "bf16"
    compile: bool = False
    seed: int = 1337
    parallel: Optional[str] = None  # under torchrun: "ddp" (default) or "fsdp" (gptfast.distributed)

    def validate(self) -> None:
        def positive(name):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")

        for name in ("steps", "batch_size", "grad_accum", "eval_batches", "log_every"):
            positive(name)
        if self.block_size is not None:
            positive("block_size")
        for name in ("warmup", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "beta1", "beta2",
                     "val_fraction", "scheduled_sampling", "dropout", "attn_dropout"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr], got {self.min_lr!r}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        for name in ("dropout", "attn_dropout"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        if not 0.0 <= self.scheduled_sampling <= 1.0:
            raise ValueError(f"scheduled_sampling must be in [0, 1], got {self.scheduled_sampling!r}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        if self.parallel not in (None, "ddp", "fsdp"):
            raise ValueError(f"parallel must be ddp or fsdp, got {self.parallel!r}")


# --------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------
def get_lr(step: int, *, lr: float, min_lr: float, warmup: int, decay_steps: int) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup from lr/warmup to lr over ``warmup``
    steps, then cosine decay to ``min_lr`` at ``decay_steps``, then constant ``min_lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= decay_steps:
        return min_lr
    ratio = (step - warmup) / max(1, decay_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def auto_threads() -> int:
    """CPU threads for torch: the cores this process may use, minus those other processes keep
    busy (1-minute load average), at least 1.

    On a shared machine this matters a lot: with every core already busy, 2 intra-op threads
    that wait on each other can run 10x slower than 1 thread.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    return max(1, min(n, int(n - busy + 0.5)))


def resolve_device(name: str = "auto") -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"invalid device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return dev


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
                    fused: bool = True) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights only (model.param_groups); fused on CUDA unless
    fused=False (FSDP2's DTensor parameters take the foreach implementation)."""
    from .model import param_groups

    groups = param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    if device.type == "cuda" and fused:
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


# peak dense bf16 tensor-core FLOP/s by GPU name (substring match, first hit wins)
PEAK_BF16_FLOPS = [
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),  # fp16 (no bf16)
    ("T4", 65e12),  # fp16 (no bf16)
]


def peak_flops(device_name: str) -> Optional[float]:
    for key, value in PEAK_BF16_FLOPS:
        if key in device_name:
            return value
    return None


def flops_per_token(n_params: int, n_layer: int, n_embd: int, block_size: int) -> float:
    """Training FLOPs per token: 6N (forward + backward matmuls) + 12·L·d·T (attention)."""
    return 6.0 * n_params + 12.0 * n_layer * n_embd * block_size


def _peak_memory(device: torch.device) -> tuple:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max allocated"
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"
    except Exception:  # noqa: BLE001
        return None, "unknown"


def _model_config(d: Dict[str, Any]):
    """GPTConfig from a stored dict, ignoring fields this version of GPTConfig does not have."""
    from .model import GPTConfig

    names = {f.name for f in dataclasses.fields(GPTConfig)}
    return GPTConfig(**{k: v for k, v in d.items() if k in names})


def resolve_checkpoint(path: Union[str, os.PathLike]) -> Path:
    """A checkpoint file, or a run folder -> its ckpt.pt. FileNotFoundError when neither."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / CKPT_NAME).is_file():
            raise FileNotFoundError(f"{path} is a folder without a {CKPT_NAME} (not a run folder)")
        return path / CKPT_NAME
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def check_finite_weights(state: Dict[str, torch.Tensor], path) -> None:
    """CheckpointError when a floating-point tensor of `state` holds NaN or inf."""
    from .checkpoint import CheckpointError

    bad = [k for k, t in state.items()
           if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CheckpointError(f"{path}: holds non-finite weights (NaN/inf in {bad[0]}{more}); it comes "
                              f"from a run that diverged: retrain with a lower --lr")


def _build_gpt(ckpt: Dict[str, Any], path):
    from .checkpoint import CheckpointError
    from .model import GPT

    try:
        config = _model_config(ckpt["model_config"])
        model = GPT(config)
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path}: checkpoint does not hold a loadable gptfast model ({type(e).__name__}: {e})") from e
    return model


def load_model(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu"):
    """Rebuild the language model stored in a checkpoint file or a run folder
    -> (model in eval mode, tokenizer, checkpoint dict).

    Raises FileNotFoundError, or CheckpointError for a file that is not a gptfast language
    model checkpoint (a fine-tuned classifier: see `load_any`) or whose weights are not finite.
    """
    path = resolve_checkpoint(path)
    return _lm_from_checkpoint(load_full_checkpoint(path), path, device)


def load_full_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """`load_checkpoint`, with the model's weights read from the shards folder when the file
    comes from an FSDP run (so every reader of a run folder sees one format)."""
    from .distributed import full_model_state, shard_folder

    ckpt = load_checkpoint(path)
    folder = shard_folder(path, ckpt)
    if folder is not None and "model" not in ckpt:
        ckpt["model"] = full_model_state(folder)
    return ckpt


def _lm_from_checkpoint(ckpt: Dict[str, Any], path, device):
    from .checkpoint import CheckpointError

    if ckpt.get("kind", "lm") != "lm":
        raise CheckpointError(f"{path}: holds a {ckpt['kind']} (gptfast finetune), not a language "
                              f"model; load it with gptfast.load")
    model = _build_gpt(ckpt, path)
    check_finite_weights(ckpt["model"], path)
    tok = _checkpoint_tokenizer(ckpt, path)
    return model.to(device).eval(), tok, ckpt


def _checkpoint_tokenizer(ckpt: Dict[str, Any], path):
    from .checkpoint import CheckpointError

    try:
        return get_tokenizer(ckpt.get("tokenizer", "byte"), ckpt.get("tokenizer_state"))
    except Exception as e:  # a missing package, a corrupt tokenizer JSON, an unknown kind
        raise CheckpointError(f"{path}: its tokenizer cannot be rebuilt ({type(e).__name__}: {e})") from e


def load_any(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu"):
    """Like `load_model`, also for fine-tuned classifiers -> (model, tokenizer, checkpoint)."""
    path = resolve_checkpoint(path)
    ckpt = load_full_checkpoint(path)
    if ckpt.get("kind", "lm") == "classifier":
        from .finetune import classifier_from_checkpoint

        model = classifier_from_checkpoint(ckpt, path)
        return model.to(device).eval(), _checkpoint_tokenizer(ckpt, path), ckpt
    return _lm_from_checkpoint(ckpt, path, device)


# --------------------------------------------------------------------------------------
# before the first step: will it fit?
# --------------------------------------------------------------------------------------
class MemoryPreflightError(ValueError):
    """A training step would need more memory than the device has; the message says what to
    change."""


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes this process can still allocate on `device` (None: unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def estimate_step_memory(model_cfg, batch_size: int, device: torch.device, bf16: bool) -> Dict[str, int]:
    """Bytes a training step needs, by part (an estimate that errs on the high side):

    state        fp32 weights, gradients and AdamW's two moments: 16 bytes a parameter
    activations  what autograd keeps per token and layer (LayerNorm in/out, q/k/v, attention
                 output, MLP in/out, residuals, dropout masks), plus embeddings and the loss's
                 hidden states; 25% more for the backward's transients
    attention    the (B, nh, T, T) scores, probabilities and their copies, kept for every
                 layer, when the attention runs on the plain reference (see gptfast.explain);
                 0 on the kernels and on PyTorch's fused SDPA CPU kernel
    loss         the linear cross-entropy's chunk buffers
    """
    from .model import count_params, explain_paths

    P = count_params(model_cfg)
    T, B, C, L = model_cfg.block_size, batch_size, model_cfg.n_embd, model_cfg.n_layer
    nh, kv = model_cfg.n_head, model_cfg.n_kv_head * model_cfg.head_size
    elt = 2 if bf16 else 4
    tokens = B * T
    per_layer = 8 * C + 2 * kv + 2 * model_cfg.n_inner              # elements per token
    masks = (2 * C + model_cfg.n_inner) if model_cfg.dropout > 0 else 0  # bool bytes per token
    activations = int(1.25 * (tokens * L * (per_layer * elt + masks) + tokens * 6 * C * 4))
    attention = 0
    paths = explain_paths(model_cfg, device=device, batch_size=B, training=True,
                          dtype=torch.bfloat16 if bf16 else torch.float32)
    if paths.attention_materializes_scores:
        # scores, masked scores, probabilities (+ dropout mask and dropped probabilities), fp32
        per = 5 if model_cfg.attn_dropout > 0 else 3
        attention = L * per * B * nh * T * T * 4
    return {"state": 16 * P, "activations": activations, "attention": attention,
            "loss": 64 << 20}


def _gib(n: float) -> str:
    return f"{n / 2**40:.1f} TiB" if n >= 2**40 else f"{n / 2**30:.1f} GiB"


HEADROOM = 0.9  # a run may plan to use this much of the free memory (allocator slack, others)


def memory_preflight(model_cfg, batch_size: int, device: torch.device, bf16: bool,
                     available: Optional[int] = None, state_shards: int = 1) -> Dict[str, int]:
    """Raise MemoryPreflightError, saying what to change, when a training step would need
    more memory than `available` (default: what the device has free now). batch_size: this
    process's rows; state_shards: processes the weights and optimizer state are sharded over
    (FSDP)."""
    need = estimate_step_memory(model_cfg, batch_size, device, bf16)
    need["state"] = -(-need["state"] // state_shards)
    have = available if available is not None else available_memory(device)
    total = sum(need.values())
    if have is None or total <= HEADROOM * have:
        return need
    parts = ", ".join(f"{k} {_gib(v)}" for k, v in need.items() if v > 0)
    advice = "lower --batch-size (--grad-accum keeps the tokens per step) or --block-size"
    if need["attention"] > total / 2:
        advice = ("the attention materializes its T x T scores here (gptfast explain says why: "
                  "on a CPU, attention dropout; --attn-dropout 0 avoids it); or " + advice)
    if need["state"] > have:
        advice = ("the model alone does not fit: choose a smaller --preset"
                  + (" or shard it over more processes" if state_shards > 1 else ""))
    raise MemoryPreflightError(
        f"a training step needs about {_gib(total)} ({parts}) but {device.type} has "
        f"{_gib(have)} available (runs use at most {HEADROOM:.0%} of it): {advice}")


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plot_history(history: List[dict], path: Path, baseline: Optional[float] = None, title: str = "") -> None:
    """Train/val loss vs step to a PNG (Agg canvas; never touches pyplot's global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    tr = [(h["step"], h["train_loss"]) for h in history if h.get("train_loss") is not None]
    va = [(h["step"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if tr:
        ax.plot(*zip(*tr), label="train", lw=1.2)
    if va:
        ax.plot(*zip(*va), "o-", label="val", lw=1.5, ms=4)
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="gray", lw=1, label=f"unigram baseline ({baseline:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --------------------------------------------------------------------------------------
# a run that diverges
# --------------------------------------------------------------------------------------
class TrainingDiverged(RuntimeError):
    """The loss (or, before a save, the weights) became NaN or infinite. The run stopped; no
    checkpoint was written after the last good one."""


def _diverged(what: str, step: int, lr: float, last_saved: Optional[int],
              ckpt_path: Path) -> TrainingDiverged:
    kept = (f"{ckpt_path} still holds step {last_saved}, the last good checkpoint"
            if last_saved is not None else
            f"no checkpoint of this run was written{' (' + str(ckpt_path) + ' is left as it was)' if ckpt_path.exists() else ''}")
    return TrainingDiverged(
        f"training diverged: {what} by step {step} (lr {lr:.3g}); stopped, {kept}. "
        f"Lower --lr, or raise --warmup; --grad-clip limits the update size")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a parameter (an FSDP2 DTensor's shard), detached."""
    t = t.detach()
    return t.to_local() if hasattr(t, "to_local") else t


def nonfinite_weights(model: torch.nn.Module) -> torch.Tensor:
    """Device bool: some weight held by this process is NaN or infinite (no sync)."""
    return ~torch.stack([_local(p).isfinite().all() for p in model.parameters()]).all()


def stop_if_diverged(nonfinite: torch.Tensor, step: int, lr: float, model: torch.nn.Module, *,
                     check_weights: bool, last_saved: Optional[int], ckpt_path: Path,
                     ctx: Optional[DistContext] = None) -> None:
    """Raise TrainingDiverged when a loss since the last check was not finite (`nonfinite`, a
    device flag accumulated without syncing) or, with check_weights (before every save), when
    a weight is not. The one place a run decides to stop: on several processes the flags are
    reduced (max) first, so every process raises at the same step, and none saves."""
    flags = torch.stack([nonfinite.to(torch.int32).reshape(()),
                         (nonfinite_weights(model) if check_weights
                          else torch.zeros_like(nonfinite)).to(torch.int32).reshape(())])
    if ctx is not None:
        ctx.all_reduce(flags, "max")
    loss_bad, weights_bad = flags.tolist()
    if loss_bad:
        raise _diverged("the loss became NaN or infinite", step, lr, last_saved, ckpt_path)
    if weights_bad:
        raise _diverged("the weights became NaN or infinite", step, lr, last_saved, ckpt_path)


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------
class ResumeMismatch(ValueError):
    """A resumed run was asked for a model other than the checkpoint's (`field` names the
    option)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@torch.no_grad()
def evaluate(model, batches, device, autocast, ctx: Optional[DistContext] = None) -> float:
    """Mean loss over `batches` (this process's rows of each); averaged over the processes,
    which hold equal row counts, it is the mean over the whole batches."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    for x, y in batches:
        with autocast():
            _, loss = model(x.to(device), y.to(device))
        total += loss.float()
    model.train(was_training)
    if ctx is not None:
        ctx.all_reduce(total, "mean")
    return float(total) / len(batches)


def _check_resume_model(cfg: TrainConfig, model_cfg, path) -> None:
    """A resumed run keeps the checkpoint's model: an explicit model option that differs is an
    error, not silently ignored."""
    asked = dict(cfg.model_overrides)
    for name in ("block_size", "dropout", "attn_dropout"):
        if getattr(cfg, name) is not None:
            asked[name] = getattr(cfg, name)
    for name, value in asked.items():
        have = getattr(model_cfg, name, None)
        if have != value:
            raise ResumeMismatch(name, f"{path} holds a model with {name}={have!r}, not {value!r}: "
                                       f"a resumed run keeps its checkpoint's model (drop the "
                                       f"option, or start a new run in another folder)")


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Train (or resume) per ``cfg``; returns the summary dict (also stored in log.json).

    Under torchrun (its environment variables), every process calls this: the run is split
    over them per ``cfg.parallel`` (see gptfast.distributed); rank 0 alone prints and writes
    the log, the plot and (DDP) the checkpoint."""
    from .distributed import launch_from_env, setup

    cfg.validate()
    launch = launch_from_env()
    if launch is not None and cfg.batch_size % launch.world_size:
        raise ValueError(
            f"batch_size {cfg.batch_size} cannot be split over {launch.world_size} processes "
            f"(WORLD_SIZE): the global batch per micro-step must be a multiple of the number of "
            f"processes, which each take batch_size / {launch.world_size} rows (the global batch "
            f"per step is batch_size x grad_accum, whatever the number of processes)")
    ctx = setup(cfg.parallel, cfg.device, launch)
    try:
        result = _train(cfg, ctx)
        # Every process is past its last collective before any of them tears the group down:
        # gloo aborts a process whose peer destroys the group while it still uses it.
        ctx.barrier()
        return result
    finally:
        ctx.close()


def _train(cfg: TrainConfig, ctx: DistContext) -> Dict[str, Any]:
    from .distributed import (load_full_into_sharded, load_sharded, remove_stale_shards,
                              save_sharded, shard_folder)
    from .model import GPT, get_config, scheduled_sampling_inputs
    from .randomness import layout_seed, sample_keys

    main = ctx.is_main
    say = print if (cfg.verbose and main) else (lambda *a, **k: None)
    device = ctx.device
    fsdp = ctx.mode == "fsdp"
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / CKPT_NAME

    resume_state = None
    if cfg.resume not in (None, False):
        rpath = ckpt_path if cfg.resume in (True, "") else Path(cfg.resume)
        resume_state = load_checkpoint(rpath)  # FileNotFoundError / CheckpointError for bad paths
        if resume_state.get("kind", "lm") != "lm":
            raise CheckpointError(f"{rpath}: holds a {resume_state['kind']} (gptfast finetune), "
                                  f"not a language model run to resume")
        if "model_config" not in resume_state or "sampler" not in resume_state:
            raise CheckpointError(f"{rpath}: not a training checkpoint of gptfast train")
        check_finite_weights(resume_state.get("model", {}), rpath)
        ckpt_path_in = rpath
    # model config: the checkpoint's when resuming, else preset + overrides
    if resume_state is not None:
        model_cfg = _model_config(resume_state["model_config"])
        _check_resume_model(cfg, model_cfg, ckpt_path_in)
        tok = _checkpoint_tokenizer(resume_state, rpath)
    else:
        overrides = dict(cfg.model_overrides)
        if cfg.block_size is not None:
            overrides["block_size"] = cfg.block_size
        if cfg.dropout is not None:
            overrides["dropout"] = cfg.dropout
        if cfg.attn_dropout is not None:
            overrides["attn_dropout"] = cfg.attn_dropout
        if cfg.tokenizer is not None:  # a Hugging Face folder's: the model takes its vocabulary
            from .hf.tokenizer import load_tokenizer
            tok = load_tokenizer(cfg.tokenizer)
            overrides.setdefault("vocab_size", tok.vocab_size)
        else:
            tok = ByteTokenizer()
        model_cfg = get_config(cfg.preset, **overrides)
    if model_cfg.vocab_size < tok.vocab_size:
        raise ValueError(
            f"preset {cfg.preset!r} has vocab_size {model_cfg.vocab_size} < the {tok.kind} "
            f"tokenizer's {tok.vocab_size}"
        )
    T = model_cfg.block_size
    rows = cfg.batch_size // ctx.world_size          # this process's rows of each micro-batch
    use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    memory_preflight(model_cfg, rows, device, use_bf16,   # before allocating anything
                     state_shards=ctx.world_size if fsdp else 1)

    corpus = load_corpus(cfg.data, max_bytes=cfg.max_bytes, val_fraction=cfg.val_fraction, tokenizer=tok)
    baseline = unigram_baseline(corpus.train, corpus.val, tok.vocab_size) if len(corpus.val) else None

    # ---- build everything in a fixed order (the RNG draws of init are part of the run) ----
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg).to(device)
    model.train()
    if resume_state is not None and "model" in resume_state and not fsdp:
        model.load_state_dict(resume_state["model"])   # before DDP copies rank 0's weights
    wrapped = ctx.wrap(model)              # DDP(model), or model sharded in place (FSDP2)
    optimizer = build_optimizer(model, cfg, device, fused=not fsdp)
    sampler = BatchSampler(corpus.train, cfg.batch_size, T, seed=cfg.seed, device=device,
                           rank=ctx.rank, world_size=ctx.world_size)
    r0 = ctx.rank * rows
    val_batches = [(x[r0:r0 + rows], y[r0:r0 + rows]) for x, y in                # this process's
                   fixed_batches(corpus.val, cfg.batch_size, T, cfg.eval_batches,   # rows of each
                                 seed=cfg.seed + 1)]
    history: List[dict] = []
    start_step = 0
    if resume_state is not None:
        folder = shard_folder(ckpt_path_in, resume_state)
        if folder is not None:
            load_sharded(folder, model, optimizer)    # any wrapping, any number of processes
            if bool(ctx.all_reduce(nonfinite_weights(model).to(torch.int32), "max")):
                raise CheckpointError(f"{folder}: holds non-finite weights; it comes from a run "
                                      f"that diverged: retrain with a lower --lr")
        elif fsdp:
            load_full_into_sharded(resume_state, model, optimizer)
        else:
            optimizer.load_state_dict(resume_state["optimizer"])
        sampler.load_state_dict(resume_state["sampler"])
        history = list(resume_state.get("history", []))
        start_step = int(resume_state["step"])
        resume_state = {k: v for k, v in resume_state.items() if k not in ("model", "optimizer")}

    if use_bf16:
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)
    run_model = torch.compile(wrapped) if cfg.compile else wrapped

    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    decay_steps = cfg.decay_steps if cfg.decay_steps is not None else cfg.steps
    n_params = model.num_params()
    fpt = flops_per_token(model.num_params(exclude_positions=True), model_cfg.n_layer, model_cfg.n_embd, T)
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    tokens_per_step = cfg.batch_size * cfg.grad_accum * T      # global: every process together
    save_every = cfg.save_every if cfg.save_every is not None else cfg.eval_every

    say(
        f"gptfast train: preset={cfg.preset} ({n_params / 1e6:.2f}M params, L={model_cfg.n_layer} "
        f"d={model_cfg.n_embd} T={T}) device={device}{' bf16' if use_bf16 else ''}"
        f"{' compiled' if cfg.compile else ''}"
    )
    if ctx.active:
        say(f"parallel: {ctx.mode} on {ctx.world_size} process(es) "
            f"({'nccl' if device.type == 'cuda' else 'gloo'}), {rows} of the {cfg.batch_size} "
            f"rows of each micro-batch per process, global batch {cfg.batch_size * cfg.grad_accum}")
    say(f"data: {corpus.describe()}")
    if tok.kind == "byte" and model_cfg.vocab_size > tok.vocab_size:
        say(f"tokenizer: byte-level ({tok.vocab_size} ids), not the BPE tokenizer preset "
            f"{cfg.preset}'s {model_cfg.vocab_size}-token vocabulary was made for (ids >= "
            f"{tok.vocab_size} stay unused); --tokenizer PATH trains with a Hugging Face one")
    elif tok.kind != "byte":
        say(f"tokenizer: {tok.path} ({tok.vocab_size} ids)")
    if baseline is not None:
        say(f"unigram baseline (val): {baseline:.4f} nats/token")
    if resume_state is not None:
        say(f"resumed from {ckpt_path_in} at step {start_step}")

    def meta(step_done: int) -> dict:
        return {
            "step": step_done,
            "model_config": dataclasses.asdict(model_cfg),
            "train_config": dataclasses.asdict(cfg),
            "tokenizer": tok.kind,
            "tokenizer_state": tokenizer_state(tok),
            "sampler": sampler.state_dict(),   # the same on every process
            "randomness": "keyed by global sample index (gptfast.randomness)",
            "parallel": ctx.mode,
            "world_size": ctx.world_size,
            "history": history,
            "unigram_baseline": baseline,
        }

    def save(step_done: int) -> None:
        if fsdp:
            save_sharded(ctx, ckpt_path, step_done, model, optimizer, meta(step_done))
        elif main:   # DDP: every process holds the same weights; rank 0 writes them
            save_checkpoint(ckpt_path, dict(meta(step_done), model=model.state_dict(),
                                            optimizer=optimizer.state_dict()))  # atomic
            remove_stale_shards(out_dir)      # shards of an earlier FSDP run in this folder

    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        disable=not (cfg.progress and main),
        desc="train",
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=0.5,
    )
    loss_sum = torch.zeros((), device=device)
    n_in_window = 0
    last_train = None
    last_val = None
    train_time = 0.0
    tokens_done = 0
    t_window = time.perf_counter()
    tok_window = 0
    step = start_step
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    last_saved = None  # the step ckpt_path holds from this run (or the one resumed from it)
    if resume_state is not None and Path(ckpt_path_in).resolve() == ckpt_path.resolve():
        last_saved = start_step
    try:
        for step in range(start_step, cfg.steps):
            t0 = time.perf_counter()
            lr = get_lr(step, lr=cfg.lr, min_lr=min_lr, warmup=cfg.warmup, decay_steps=decay_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            for micro in range(cfg.grad_accum):
                x, y = sampler.next()
                keys = sample_keys(cfg.seed, sampler.first_index, rows, device)      # (rows,)
                # What is not keyed per row (attention dropout) draws from a generator seeded
                # by this process's position in the run: reproducible for a given layout.
                torch.manual_seed(layout_seed(cfg.seed, sampler.first_index))
                if cfg.scheduled_sampling > 0:
                    x = scheduled_sampling_inputs(model, x, cfg.scheduled_sampling,
                                                  sample_keys=keys)
                with ctx.sync_gradients(wrapped, micro == cfg.grad_accum - 1):
                    with autocast():
                        _, loss = run_model(x, y, sample_keys=keys)
                    (loss / cfg.grad_accum).backward()
                loss_sum += loss.detach().float() / cfg.grad_accum
                nonfinite |= ~torch.isfinite(loss.detach())     # no host sync
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n_in_window += 1
            done = step + 1
            is_last = done == cfg.steps
            will_save = is_last or bool(save_every and done % save_every == 0)
            if (device.type == "cpu" or will_save or done % cfg.log_every == 0
                    or (cfg.eval_every and done % cfg.eval_every == 0)):
                # On a GPU this syncs: only where the loop syncs anyway, and before a save.
                stop_if_diverged(nonfinite, done, lr, model, check_weights=will_save,
                                 last_saved=last_saved, ckpt_path=ckpt_path, ctx=ctx)
            if n_in_window >= cfg.log_every or is_last:
                # one sync (and one all-reduce) per log window: the mean over every process
                last_train = float(ctx.all_reduce(loss_sum.clone(), "mean")) / n_in_window
                loss_sum.zero_()
                n_in_window = 0
            train_time += time.perf_counter() - t0
            tokens_done += tokens_per_step
            tok_window += tokens_per_step
            bar.update(1)
            record = {"step": done, "lr": lr, "train_loss": None, "val_loss": None}
            if done % cfg.log_every == 0 or is_last:
                record["train_loss"] = last_train
                now = time.perf_counter()
                tps = tok_window / max(now - t_window, 1e-9)
                t_window, tok_window = now, 0
                post = {"loss": f"{last_train:.4f}", "tok/s": f"{tps:,.0f}"}
                if last_val is not None:
                    post["val"] = f"{last_val:.4f}"
                bar.set_postfix(post, refresh=False)
            if (cfg.eval_every and done % cfg.eval_every == 0) or is_last:
                last_val = evaluate(run_model, val_batches, device, autocast, ctx)
                if not math.isfinite(last_val):
                    raise _diverged(f"the validation loss is {last_val}", done, lr, last_saved,
                                    ckpt_path)
                record["val_loss"] = last_val
                bar.set_postfix({"loss": f"{last_train:.4f}" if last_train is not None else "-",
                                 "val": f"{last_val:.4f}"}, refresh=False)
            if record["train_loss"] is not None or record["val_loss"] is not None:
                history.append(record)
            if will_save:
                save(done)            # the old checkpoint or the new one, never half of one
                last_saved = done
    finally:
        bar.close()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    final_val = last_val
    if final_val is None and start_step >= cfg.steps:  # nothing left to train: just evaluate
        final_val = evaluate(run_model, val_batches, device, autocast, ctx)
    # the slowest process's time and memory: the run waits for it
    train_time = float(ctx.all_reduce(torch.tensor([train_time], device=device), "max"))
    mem, mem_kind = _peak_memory(device)
    if ctx.active and mem is not None:
        mem = int(ctx.all_reduce(torch.tensor([mem], device=device, dtype=torch.float64), "max"))
        mem_kind += " (the largest process)"
    tps = tokens_done / train_time if train_time > 0 else None
    mfu = (fpt * tps / (peak * ctx.world_size)) if (peak and tps) else None
    summary = {
        "steps": cfg.steps,
        "start_step": start_step,
        "params": n_params,
        "device": str(device) if device.type != "cuda" else f"cuda ({torch.cuda.get_device_name(device)})",
        "parallel": ctx.mode,
        "world_size": ctx.world_size,
        "bf16": use_bf16,
        "tokens": tokens_done,
        "train_time_s": train_time,
        "tokens_per_s": tps,
        "flops_per_token": fpt,
        "mfu": mfu,
        "peak_memory_bytes": mem,
        "peak_memory_kind": mem_kind,
        "train_loss": last_train,
        "val_loss": final_val,
        "unigram_baseline": baseline,
        "checkpoint": str(ckpt_path),
        "out_dir": str(out_dir),
    }
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(
            out_dir / "log.json",
            {
                "history": history,
                "summary": summary,
                "train_config": dataclasses.asdict(cfg),
                "model_config": dataclasses.asdict(model_cfg),
            },
        )
        if cfg.plot and history:
            plot_history(history, out_dir / "loss.png", baseline, title=f"gptfast {cfg.preset}")
        if cfg.verbose:
            say(format_summary(summary))
    return summary


def format_summary(s: Dict[str, Any]) -> str:
    def f(v, spec):
        return "n/a" if v is None else format(v, spec)

    lines = [
        "---- summary ----",
        f"steps          {s['start_step']} -> {s['steps']}  ({s['tokens']:,} tokens in {s['train_time_s']:.1f} s)",
        f"throughput     {f(s['tokens_per_s'], ',.0f')} tokens/s",
        f"MFU            {'n/a (CPU or unknown GPU)' if s['mfu'] is None else format(100 * s['mfu'], '.1f') + '%'}",
        f"peak memory    {_fmt_bytes(s['peak_memory_bytes'])} ({s['peak_memory_kind']})",
        f"train loss     {f(s['train_loss'], '.4f')}",
        f"val loss       {f(s['val_loss'], '.4f')}",
        f"unigram base   {f(s['unigram_baseline'], '.4f')}",
        f"checkpoint     {s['checkpoint']}",
    ]
    return "\n".join(lines)
