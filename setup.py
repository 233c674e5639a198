"""Install gptfast; the top-level `kernels/` folder becomes `gptfast.kernels` and
`benchmarks/` becomes `gptfast.benchmarks` (so `gptfast bench` runs from an installed package).

PyPI already has an unrelated package called `kernels`, so the Triton kernels are never
installed under that name: `package_dir` maps them inside the gptfast namespace.
"""
from setuptools import setup

setup(
    name="gptfast",
    version="0.1.0",
    description="Fused causal attention and fused linear cross-entropy kernels for GPT models",
    python_requires=">=3.9",
    packages=["gptfast", "gptfast.ops", "gptfast.hf", "gptfast.kernels",
              "gptfast.benchmarks"],
    package_dir={"gptfast": "gptfast", "gptfast.kernels": "kernels",
                 "gptfast.benchmarks": "benchmarks"},
    package_data={"gptfast.kernels": ["*_configs.json"]},  # the launch configuration tables
    install_requires=["torch>=2.6", "numpy", "tqdm", "matplotlib"],
    extras_require={
        "dev": ["pytest>=7", "pytest-timeout", "pytest-benchmark"],
        # gptfast.hf: patch transformers models, load/save GPT-2 and BLOOM checkpoints and their
        # tokenizers. Tested with transformers 5.17 and 5.24 (README).
        "hf": ["transformers>=5.17,<6", "safetensors>=0.4", "tokenizers>=0.21"],
    },
    entry_points={"console_scripts": ["gptfast=gptfast.cli:main"]},
)
