"""pytest set-up for benchmarks/bench_host.py: when the pytest-benchmark plugin is missing (the
offline GPU machines), a minimal `benchmark` fixture with the part of its interface the file uses
(`benchmark(fn)`, `.group`, `.extra_info`, `.stats.stats.median` in seconds)."""
import statistics
import time
from types import SimpleNamespace

import pytest

try:
    import pytest_benchmark  # noqa: F401
    HAVE_PLUGIN = True
except ImportError:
    HAVE_PLUGIN = False


if not HAVE_PLUGIN:
    def pytest_configure(config):
        config.addinivalue_line("markers", "benchmark(**options): pytest-benchmark options")

    class _Benchmark:
        def __init__(self, options):
            self.timer = options.get("timer", time.perf_counter)
            self.rounds = options.get("min_rounds", 20)
            self.group, self.extra_info, self.stats = None, {}, None

        def __call__(self, fn):
            for _ in range(50):
                fn()
            times = []
            for _ in range(self.rounds):
                t0 = self.timer()
                for _ in range(20):
                    fn()
                times.append((self.timer() - t0) / 20)
            self.stats = SimpleNamespace(stats=SimpleNamespace(median=statistics.median(times)))

    @pytest.fixture
    def benchmark(request):
        marker = request.node.get_closest_marker("benchmark")
        return _Benchmark(marker.kwargs if marker else {})
