"""The torch boundary: public functional ops, backend choice, and the references."""
from . import _triton  # noqa: F401 - registers the Triton kernels under the gptfast::triton_* ops
from .attention import attention
from .backends import BackendError, explain, report
from .cross_entropy import (LINEAR_CE_BUDGET, cross_entropy, linear_cross_entropy,
                            linear_cross_entropy_memory)

__all__ = ["attention", "cross_entropy", "linear_cross_entropy", "linear_cross_entropy_memory",
           "LINEAR_CE_BUDGET", "explain", "report", "BackendError"]
