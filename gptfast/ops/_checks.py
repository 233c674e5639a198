"""Argument checks shared by the public ops: every error names the argument and what was
expected. Only tensor metadata is inspected (no host sync), so the checks trace under
torch.compile."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, *, ndim: Optional[int] = None,
                 dtypes: Optional[Sequence[torch.dtype]] = None, what: str = "") -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {what}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {t.dtype}")
    return t


def check_same_device(**tensors: Optional[Tensor]) -> torch.device:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for n, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{n} is on {t.device} but {first_name} is on {first.device}: "
                             f"all tensors must be on one device")
    return first.device


def check_same_dtype(**tensors: Optional[Tensor]) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for n, t in named[1:]:
        if t.dtype != first.dtype:
            raise TypeError(
                f"{n} has dtype {t.dtype} but {first_name} has {first.dtype}: outside "
                f"torch.autocast the dtypes must match (inside autocast they are cast)")


# One call telling whether any autocast context is on (much cheaper than asking per device).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_on() -> bool:
    """Whether some autocast context is active (then `follow_autocast` may cast)."""
    return True if _any_autocast is None else _any_autocast()


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast would give a matmul on this device, or None outside autocast."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def follow_autocast(device: torch.device, *tensors: Optional[Tensor]):
    """Inside autocast, cast floating inputs the way a matmul would; otherwise leave them."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def check_choice(name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {list(allowed)}, got {value!r}")


def check_range(name: str, value: float, lo: float, hi: float, *, hi_open: bool = False) -> None:
    ok = lo <= value < hi if hi_open else lo <= value <= hi
    if not ok:
        bracket = ")" if hi_open else "]"
        raise ValueError(f"{name}: expected a value in [{lo}, {hi}{bracket}, got {value!r}")
