"""Which implementation runs an op: backend availability, per-op support, and the choice.

Backends, in the order `"auto"` tries them:
  "cuda"   - CUDA C++ kernels from `csrc/`, built as the extension `gptfast._C` (on CUDA
             tensors; on CPU tensors only when GPTFAST_CUDA_SIM=1 is set, through the CPU
             execution layer of `gptfast/cuda_sim.py`, and only when asked for by name);
  "triton" - Triton kernels from `kernels/` (on CUDA tensors; on CPU tensors only when
             TRITON_INTERPRET=1 was set before Triton was imported, which is how CI tests them,
             and only when asked for by name: "auto" never runs the interpreter; bf16 there
             only where the interpreter computes it right, see kernels/_interpreter.py);
  "torch"  - the plain-PyTorch reference (`reference.py`): every option, every device.

Each op module registers, per kernel backend, a function that looks at the op's input facts (a
small hashable tuple: dtype, head dim, ...) and returns None when that backend can run them, or a
sentence saying why not. It may also register an "auto" policy: a function of the same facts that
returns a sentence when `"auto"` should pass a backend over although it can run the inputs (a
kernel not yet measured faster than the next one), and None otherwise; asking for the backend by
name still runs it. `choose()` turns those into a `Decision`, cached per distinct facts, which
`gptfast.explain(...)` prints and the debug log records.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

from . import _library  # noqa: F401 - the op schemas, declared before gptfast._C registers kernels

log = logging.getLogger("gptfast")

BACKENDS = ("cuda", "triton", "torch")
KERNEL_BACKENDS = ("cuda", "triton")

SupportFn = Callable[[tuple], Optional[str]]
_SUPPORT: Dict[str, Dict[str, SupportFn]] = {}
_AUTO_POLICY: Dict[str, Dict[str, SupportFn]] = {}
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
    error: Optional[str] = None  # set when the requested backend cannot run the inputs
    # What the "torch" backend runs for these inputs (its fast path or the plain reference).
    torch_path: Optional[str] = None
    # backend -> why "auto" passes it over although it can run these inputs.
    auto_skipped: Dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{self.op}: backend={self.requested!r} -> runs on {self.backend!r}"]
        for name in BACKENDS:
            why = self.reasons.get(name)
            line = "can run these inputs" if why is None else f"no: {why}"
            if why is None and name in self.auto_skipped:
                line += f" (by name only: {self.auto_skipped[name]})"
            if name == "torch" and self.torch_path:
                line += f" ({self.torch_path})"
            lines.append(f"  {name:7s} {line}")
        return "\n".join(lines)


def register_support(op: str, backend: str, fn: SupportFn) -> None:
    _SUPPORT.setdefault(op, {})[backend] = fn


def register_auto_policy(op: str, backend: str, fn: SupportFn) -> None:
    """fn(facts) -> a sentence when "auto" should not pick `backend` for these inputs although
    it can run them (e.g. it is not yet measured faster than the next backend), else None."""
    _AUTO_POLICY.setdefault(op, {})[backend] = fn


def register_planner(op: str, fn: Callable[..., Decision]) -> None:
    _PLANNERS[op] = fn


# ---- availability of a backend on a device, whatever the op ---------------------------------

# Facts about this process, probed at most once and kept in plain module attributes: an op call
# re-probes nothing, `import gptfast` imports neither Triton nor torch._dynamo, and code traced by
# torch.compile reads them as constants. TRITON_INTERPRET is read when gptfast is imported (it
# must be set before Triton is imported anyway).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_CUDA_SIM = os.environ.get("GPTFAST_CUDA_SIM", "0") == "1"
_TRITON_SPEC = importlib.util.find_spec("triton") is not None
_triton_version_probed: Optional[str] = None  # set by the first eager probe
_triton_probed = False


def interpreter_enabled() -> bool:
    return _INTERPRET


def _probe_triton() -> Optional[str]:
    """Triton's version, or None when it cannot be imported. Imports Triton (about a second) the
    first time a Triton backend could run, not when gptfast is imported."""
    global _triton_probed, _triton_version_probed
    if not _triton_probed:
        if torch.compiler.is_compiling():  # no imports inside a trace; the spec says enough
            return "unknown" if _TRITON_SPEC else None
        try:
            _triton_version_probed = importlib.import_module("triton").__version__
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            _triton_version_probed = None
        _triton_probed = True
    return _triton_version_probed


def _triton_version() -> Optional[str]:
    return _probe_triton() if _TRITON_SPEC else None


def interpreter_bf16_problem() -> Optional[str]:
    """Why the Triton interpreter cannot run bf16 kernels here, or None when it can. The
    interpreter computes bf16 wrongly in Triton 3.6-3.8; `gptfast.kernels._interpreter` checks
    the installed one with a self-test and fixes it (once, on the first bf16 question). Inside a
    torch.compile trace nothing is imported or run: the launchers ask again when they run (and
    raise a clear error then if bf16 cannot be made right)."""
    if torch.compiler.is_compiling():
        return None
    try:
        from gptfast.kernels import _interpreter
    except ImportError as e:  # pragma: no cover - Triton present but its internals moved
        return f"the interpreter's bf16 check failed to import ({e})"
    return _interpreter.bf16_problem()


def triton_unavailable(device: torch.device) -> Optional[str]:
    if not _TRITON_SPEC:
        return "Triton is not installed"
    if device.type == "cpu" and not _INTERPRET:
        return "tensors are on the CPU and TRITON_INTERPRET=1 is not set (Triton needs a GPU)"
    if device.type not in ("cpu", "cuda"):
        return f"Triton does not run on {device.type} tensors"
    if _triton_version() is None:
        return "Triton is installed but fails to import"
    return None


def _load_cuda_extension():
    """Import `gptfast._C` (it registers the `gptfast::cuda_*` kernels) when it was built.
    Returns (module or None, why not)."""
    if importlib.util.find_spec("gptfast._C") is None:
        return None, "the CUDA extension gptfast._C is not built"
    try:
        return importlib.import_module("gptfast._C"), None
    except ImportError as e:
        return None, f"the CUDA extension gptfast._C failed to load ({e})"


_CUDA_EXT, _CUDA_EXT_WHY = _load_cuda_extension()


def cuda_extension():
    """The compiled `gptfast._C` module, or None when it was not built (or failed to load)."""
    return _CUDA_EXT


def cuda_sim_enabled() -> bool:
    return _CUDA_SIM


def cuda_unavailable(device: torch.device) -> Optional[str]:
    if device.type == "cpu" and _CUDA_SIM:
        return None  # the CPU execution layer: built and loaded when first chosen (_decide)
    if device.type == "cpu":
        return ("the CUDA kernels need CUDA tensors, got cpu tensors (GPTFAST_CUDA_SIM=1 runs "
                "them on the CPU execution layer, for tests)")
    if device.type != "cuda":
        return f"the CUDA kernels need CUDA tensors, got {device.type} tensors"
    if _CUDA_EXT is None:
        return _CUDA_EXT_WHY
    return None


def mma_sync_dtype_problem(dtype: torch.dtype) -> Optional[str]:
    """Why the CUDA C++ tensor-core kernels (mma.sync tiles) cannot take `dtype`, or None."""
    if dtype == torch.float32:
        return ("float32 is not supported: these kernels are built on mma.sync, which has no "
                "fp32 form, and gptfast does not silently use TF32 (use fp16/bf16, or "
                "backend='triton' / 'torch')")
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} is not supported (fp16, bf16)"
    return None


_cuda_sim_module = None


def _load_cuda_sim() -> Optional[str]:
    """Build (first time) and load the CPU execution layer, which registers the CPU kernels of
    the gptfast::cuda_* ops. Returns why it cannot, or None. Under torch.compile it must already
    be loaded (any eager call does it, or gptfast.cuda_sim.load())."""
    global _cuda_sim_module
    if _cuda_sim_module is None:
        from .. import cuda_sim
        try:
            _cuda_sim_module = cuda_sim.load()
        except Exception as e:  # noqa: BLE001 - reported as the reason, never silently skipped
            return f"the CUDA sim layer (GPTFAST_CUDA_SIM=1) failed to build or load: {e}"
    return None


_AVAILABILITY = {"cuda": cuda_unavailable, "triton": triton_unavailable}

# (op, requested, device, facts) -> Decision. Facts are the few hashable properties of the
# inputs that support depends on (dtype, head dim, ...), so the cache stays small.
_DECISIONS: Dict[tuple, "Decision"] = {}


def choose(op: str, requested: str, device: torch.device, facts) -> Decision:
    """Pick the backend for `op` on inputs with these `facts` (the hashable tuple the op's
    support functions read), or raise BackendError saying why not. Cached per distinct
    (op, requested, device, facts): an op call pays one dictionary lookup."""
    compiling = torch.compiler.is_compiling()
    key = (op, requested, device, facts)
    decision = None if compiling else _DECISIONS.get(key)
    if decision is None:
        decision = _decide(op, requested, device, facts)
        if not compiling and len(_DECISIONS) < 4096:
            _DECISIONS[key] = decision
    if decision.error is not None:
        raise BackendError(decision.error)
    if not compiling and log.isEnabledFor(logging.DEBUG):
        log.debug("%s", decision)
    return decision


def _decide(op: str, requested: str, device: torch.device, facts) -> Decision:
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
                    why = support(facts)
                except ImportError as e:  # a kernel module that fails to import
                    why = f"the {name} kernels for {op} failed to import ({e})"
            if why is None and name == "triton" and interpreter_enabled() \
                    and getattr(facts, "dtype", None) == torch.bfloat16:
                why = interpreter_bf16_problem()
        reasons[name] = why

    error = None
    auto_skipped: Dict[str, str] = {}
    for name, policy in _AUTO_POLICY.get(op, {}).items():
        if reasons.get(name) is None:
            why = policy(facts)
            if why is not None:
                auto_skipped[name] = why
    if requested == "auto":
        # The Triton interpreter is a test harness (thousands of times slower than the
        # reference), so "auto" never picks it; backend="triton" asks for it explicitly.
        # Likewise the CUDA kernels' CPU execution layer.
        auto_ok = {b: why for b, why in reasons.items()
                   if why is None and b not in auto_skipped
                   and not (b in KERNEL_BACKENDS and device.type == "cpu")}
        backend = next(b for b in BACKENDS if b in auto_ok)
    elif reasons[requested] is None:
        backend = requested
        if backend == "cuda" and device.type == "cpu":
            why = _load_cuda_sim()
            if why is not None:
                reasons["cuda"] = why
                able = [b for b in BACKENDS if reasons[b] is None]
                error = (f"{op}: backend='cuda' cannot run these inputs: {why}. "
                         f"Backends that can: {', '.join(able)}")
    else:
        able = [b for b in BACKENDS if reasons[b] is None]
        backend = requested
        error = (f"{op}: backend={requested!r} cannot run these inputs: "
                 f"{reasons[requested]}. Backends that can: {', '.join(able)}")
    return Decision(op, requested, backend, reasons, error, auto_skipped=auto_skipped)


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
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, "
                 f"GPTFAST_CUDA_SIM={os.environ.get('GPTFAST_CUDA_SIM', '0')}")
    if interpreter_enabled() and _triton_version() is not None:
        why = interpreter_bf16_problem()
        from gptfast.kernels import _interpreter
        state = {"native": "right as installed (self-test passed)",
                 "patched": "made right by gptfast's fix (self-test passed)"}
        lines.append("  bf16 under the interpreter: "
                     + (f"refused: {why}" if why else state[_interpreter.bf16_state()]))
    lines.append(f"backends on {device.type} (besides 'torch', which runs everything):")
    for op in sorted(set(_PLANNERS) | set(_SUPPORT)):
        for name in KERNEL_BACKENDS:
            why = _AVAILABILITY[name](device)
            if why is None and name not in _SUPPORT.get(op, {}):
                why = f"gptfast has no {name} kernel for {op} yet"
            state = "available (support depends on the inputs)" if why is None else f"no: {why}"
            lines.append(f"  {op:22s} {name:7s} {state}")
    return "\n".join(lines)
