"""Launch-grid limits, shared by the launchers of `gptfast.kernels`.

CUDA caps a grid at 2**31 - 1 blocks on axis x (Triton's axis 0) and 65,535 on axes y and z.
A per-(batch, head) or per-vocabulary-tile axis can pass 65,535 at ordinary shapes (B = 4096
sequences of 16 heads is 65,536 (batch, head) pairs), so every launcher puts such products on
axis 0, folded with the tile index, and the kernels decode the flat program id. Only axes with
a small bound by construction (e.g. the vocabulary splits of the lean cross-entropy forward,
at most 2 per SM) ride on axis 1. The Triton interpreter does not enforce these limits: the
grids are computed by small pure functions that the tests call with huge shapes.
"""
from __future__ import annotations

from typing import Tuple

MAX_GRID = (2**31 - 1, 65_535, 65_535)


def checked_grid(*axes: int) -> Tuple[int, ...]:
    """The grid `axes`, after checking it against CUDA's limits (ValueError otherwise)."""
    if not 1 <= len(axes) <= 3:
        raise ValueError(f"a grid has 1 to 3 axes, got {axes}")
    for i, (n, cap) in enumerate(zip(axes, MAX_GRID)):
        if not 0 <= int(n) <= cap:
            raise ValueError(f"launch grid {tuple(axes)}: axis {i} has {n} programs, over "
                             f"CUDA's limit of {cap} for that axis (the inputs are too large "
                             f"for one launch)")
    return tuple(int(n) for n in axes)
