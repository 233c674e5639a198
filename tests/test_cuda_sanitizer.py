"""The CPU layer's sanitizer build (AddressSanitizer + UBSan with signed-overflow checks), which
`make test-cuda_sanitize` loads in its own process (the ASan runtime preloaded): undefined
behaviour in a kernel stops the process with the sanitizer's report. Only this suite runs these;
the same suite also reruns the tests marked cuda_sanitize on that build."""
import os
import subprocess
import sys

import pytest

from _cuda_sim import sim
from gptfast import cuda_sim

pytestmark = pytest.mark.cuda_sanitize

# check kernel (csrc/sim/checks.cu) -> (argument, the sanitizer's report)
SANITIZER_ONLY = {
    "signed_overflow": (1, "signed integer overflow"),
    "heap_overflow": (1000, "AddressSanitizer: heap-buffer-overflow"),
}


def _require_sanitizer_build():
    if os.environ.get(cuda_sim.SANITIZE_ENV) != "1":
        pytest.fail("needs the sanitizer build: run through `make test-cuda_sanitize`")


def test_the_sanitizer_build_is_loaded():
    _require_sanitizer_build()
    assert sim().__name__.endswith("_asan")
    with open("/proc/self/maps") as maps:
        assert "libasan" in maps.read()


@pytest.mark.parametrize("name", sorted(SANITIZER_ONLY))
def test_undefined_behaviour_in_a_kernel_stops_the_process(name):
    """A child process with the same preload runs the kernel and must die with the report."""
    _require_sanitizer_build()
    arg, report = SANITIZER_ONLY[name]
    code = f"from gptfast import cuda_sim; cuda_sim.load().run_check({name!r}, {arg})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ))
    assert proc.returncode != 0, proc.stdout
    assert report in proc.stderr
