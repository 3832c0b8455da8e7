import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "tokemb_fast" / "_version.py").read_text()).group(1)

setup(
    name="tokemb-fast",
    version=VERSION,
    description="Fused token + position embedding (GPT-2 style) in Triton, with a deterministic backward",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    python_requires=">=3.9",
    # kernels/ ships inside the package: a top-level module named `kernels` belongs to another project.
    packages=["tokemb_fast", "tokemb_fast.kernels"],
    package_dir={"tokemb_fast": "tokemb_fast", "tokemb_fast.kernels": "kernels"},
    package_data={"tokemb_fast": ["assets/*.tiktoken", "assets/*.txt", "assets/NOTICE", "py.typed"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.6,<3",
        "triton>=3.2",
        "tiktoken>=0.7",
        "numpy",  # torch warns at import without it; Triton's CPU interpreter needs it
    ],
    extras_require={
        # liger-kernel: the Triton peer the benchmarks time beside the fused op (LigerEmbeddingFunction,
        # an atomic backward); the tests drive that row on the CPU. Its needs are torch and triton.
        "test": ["pytest>=8", "pytest-xdist>=3", "pytest-benchmark>=4", "hypothesis>=6", "matplotlib>=3.7",
                 "liger-kernel>=0.6,<0.9; python_version >= '3.10'"],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.7", "liger-kernel>=0.6,<0.9; python_version >= '3.10'"],
        # Upper bounds: the newest releases the tests ran with (README, "Limitations").
        "hf": ["transformers>=4.45,<5.26"],
        "export": ["onnx>=1.18,<1.24", "onnxscript>=0.5,<0.8", "onnxruntime>=1.22,<1.33"],
    },
    entry_points={"console_scripts": ["tokemb-fast=tokemb_fast.cli:main"]},
)
