"""Which implementation runs an op: backend availability, per-op support, and the choice.

Backends, in the order `"auto"` tries them:
  "cuda"   - CUDA C++ kernels from `csrc/`, built as the extension `gptfast._C`;
  "triton" - Triton kernels from `kernels/` (on CUDA tensors; on CPU tensors only when
             TRITON_INTERPRET=1 was set before Triton was imported, which is how CI tests them,
             and only when asked for by name: "auto" never runs the interpreter);
  "torch"  - the plain-PyTorch reference (`reference.py`): every option, every device.

Each op module registers, per kernel backend, a function that looks at the op's inputs and
returns None when that backend can run them, or a sentence saying why not. `choose()` turns
those into a `Decision`, which `gptfast.explain(...)` prints and the debug log records.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

log = logging.getLogger("gptfast")

BACKENDS = ("cuda", "triton", "torch")
KERNEL_BACKENDS = ("cuda", "triton")

SupportFn = Callable[[dict], Optional[str]]
_SUPPORT: Dict[str, Dict[str, SupportFn]] = {}
_PLANNERS: Dict[str, Callable[..., "Decision"]] = {}


class BackendError(RuntimeError):
    """A backend was asked for that cannot run these inputs."""


@dataclass
class Decision:
    op: str
    requested: str
    backend: str
    # backend -> why it cannot run these inputs (None: it can).
    reasons: Dict[str, Optional[str]] = field(default_factory=dict)
    # What the "torch" backend runs for these inputs (its fast path or the plain reference).
    torch_path: Optional[str] = None

    def __str__(self) -> str:
        lines = [f"{self.op}: backend={self.requested!r} -> runs on {self.backend!r}"]
        for name in BACKENDS:
            why = self.reasons.get(name)
            line = "can run these inputs" if why is None else f"no: {why}"
            if name == "torch" and self.torch_path:
                line += f" ({self.torch_path})"
            lines.append(f"  {name:7s} {line}")
        return "\n".join(lines)


def register_support(op: str, backend: str, fn: SupportFn) -> None:
    _SUPPORT.setdefault(op, {})[backend] = fn


def register_planner(op: str, fn: Callable[..., Decision]) -> None:
    _PLANNERS[op] = fn


# ---- availability of a backend on a device, whatever the op ---------------------------------

# The probes below run eagerly even while torch.compile traces a caller: their answers are
# facts about this process, constant for the life of the compiled graph.

@torch.compiler.assume_constant_result
def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)  # probed once: an op call must not retry imports
def _probe_triton() -> Optional[str]:
    try:
        return importlib.import_module("triton").__version__
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


@torch.compiler.assume_constant_result
def _triton_version() -> Optional[str]:
    return _probe_triton()


def triton_unavailable(device: torch.device) -> Optional[str]:
    if _triton_version() is None:
        return "Triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreter_enabled():
        return None
    if device.type == "cpu":
        return "tensors are on the CPU and TRITON_INTERPRET=1 is not set (Triton needs a GPU)"
    return f"Triton does not run on {device.type} tensors"


@functools.lru_cache(maxsize=None)
def cuda_extension():
    """The compiled `gptfast._C` module, or None when it was not built."""
    try:
        return importlib.import_module("gptfast._C")
    except ImportError:
        return None


@torch.compiler.assume_constant_result
def _cuda_extension_built() -> bool:
    return cuda_extension() is not None


def cuda_unavailable(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"the CUDA kernels need CUDA tensors, got {device.type} tensors"
    if not _cuda_extension_built():
        return "the CUDA extension gptfast._C is not built (csrc/ has no kernels yet)"
    return None


_AVAILABILITY = {"cuda": cuda_unavailable, "triton": triton_unavailable}


def choose(op: str, requested: str, device: torch.device, inputs: dict) -> Decision:
    """Pick the backend for `op` on these inputs, or raise BackendError saying why not."""
    if requested not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of 'auto', 'cuda', 'triton', 'torch'; "
                         f"got {requested!r}")
    reasons: Dict[str, Optional[str]] = {"torch": None}
    for name in KERNEL_BACKENDS:
        why = _AVAILABILITY[name](device)
        if why is None:
            support = _SUPPORT.get(op, {}).get(name)
            if support is None:
                why = f"gptfast has no {name} kernel for {op} yet"
            else:
                try:
                    why = support(inputs)
                except ImportError as e:  # a kernel module that fails to import
                    why = f"the {name} kernels for {op} failed to import ({e})"
        reasons[name] = why

    if requested == "auto":
        # The Triton interpreter is a test harness (thousands of times slower than the
        # reference), so "auto" never picks it; backend="triton" asks for it explicitly.
        auto_ok = {b: why for b, why in reasons.items()
                   if why is None and not (b == "triton" and device.type == "cpu")}
        backend = next(b for b in BACKENDS if b in auto_ok)
    elif reasons[requested] is None:
        backend = requested
    else:
        able = [b for b in BACKENDS if reasons[b] is None]
        raise BackendError(f"{op}: backend={requested!r} cannot run these inputs: "
                           f"{reasons[requested]}. Backends that can: {', '.join(able)}")
    decision = Decision(op, requested, backend, reasons)
    if not torch.compiler.is_compiling() and log.isEnabledFor(logging.DEBUG):
        log.debug("%s", decision)
    return decision


def explain(op, *args, **kwargs) -> Decision:
    """Which backend `op(*args, **kwargs)` would run on, and why each other one would not.

    `op` is a gptfast op (`gptfast.attention`) or its name ("attention"). Nothing is computed.
    `print(gptfast.explain(gptfast.attention, q, k, v))` shows the decision.
    """
    name = op if isinstance(op, str) else getattr(op, "__name__", str(op))
    if name not in _PLANNERS:
        raise ValueError(f"explain: unknown op {name!r}; known: {sorted(_PLANNERS)}")
    return _PLANNERS[name](*args, **kwargs)


def report() -> str:
    """Versions, the GPU if any, and which backends each op can use here (for `gptfast info`)."""
    lines = [f"torch   {torch.__version__}",
             f"triton  {_triton_version() or 'not installed'}",
             f"CUDA    {torch.version.cuda or 'none (CPU build)'}"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"GPU     {props.name}, sm_{props.major}{props.minor}, "
                     f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB")
        device = torch.device("cuda")
    else:
        lines.append("GPU     none")
        device = torch.device("cpu")
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    lines.append(f"backends on {device.type} (besides 'torch', which runs everything):")
    for op in sorted(set(_PLANNERS) | set(_SUPPORT)):
        for name in KERNEL_BACKENDS:
            why = _AVAILABILITY[name](device)
            if why is None and name not in _SUPPORT.get(op, {}):
                why = f"gptfast has no {name} kernel for {op} yet"
            state = "available (support depends on the inputs)" if why is None else f"no: {why}"
            lines.append(f"  {op:22s} {name:7s} {state}")
    return "\n".join(lines)
