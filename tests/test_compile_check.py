"""scripts/compile_check.py --quick: the Triton kernels compile with Triton's real compiler for
sm_90a (no GPU needed) and fit in shared memory. The interpreter the other kernel tests use
accepts code that the compiler rejects; this catches it on CPU."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _launched_kernels(path: Path):
    """Names of the @triton.jit functions that the module launches as `name[grid]`."""
    src = path.read_text()
    jitted = re.findall(r"@triton\.jit\s*\ndef (\w+)\(", src)
    return [name for name in jitted if re.search(rf"\b{name}\[", src)]


@pytest.mark.static_check
def test_compile_check_quick():
    kernels = (_launched_kernels(ROOT / "kernels" / "attention.py")
               + _launched_kernels(ROOT / "kernels" / "cross_entropy.py"))
    assert len(kernels) >= 10, kernels
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_check.py"), "--quick"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    for name in kernels:
        assert re.search(rf"^OK\s+{name}\s", proc.stdout, re.M), f"{name} not compiled:\n{out[-6000:]}"
