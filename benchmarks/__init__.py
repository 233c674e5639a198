"""gptfast's benchmarks, installed as `gptfast.benchmarks` (run them with `gptfast bench NAME`).

Each `bench_<name>.py` is also a plain script (`python benchmarks/bench_<name>.py`); they share
`harness.py`. See README.md in this folder.
"""
