"""jei-edge packaging. The runtime needs numpy (+ a backend); everything heavy is an extra."""

import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "jei_edge" / "__init__.py").read_text()).group(1)

cpu = ["onnxruntime>=1.17"]
build = ["torch>=2.6", "onnx>=1.15", "scikit-learn>=1.2", "tqdm>=4.60", "click>=8.0"] + cpu
images = ["pillow>=9"]
plots = ["matplotlib>=3.6"]
cuda = ["cuda-python>=12.6"]
rtx = ["tensorrt-rtx>=1.7"]  # engines for RTX GPUs, built ahead of time without a GPU
selftest = ["polygraphy>=0.49"]  # `jei-edge selftest`: per-stage comparison with Polygraphy's comparator
sign = ["cryptography>=42"]  # `jei-edge keygen / sign`, and runtimes that require signed bundles (Ed25519)
# `jei-edge serve` / `export triton` (docs/serving.md): PyTriton's wheel ships tritonserver; it needs numpy < 2,
# so install this extra into its own environment (`make setup-serve`, pinned by requirements/serve.txt)
serve = ["numpy>=1.22,<2", "nvidia-pytriton>=0.7", "tritonclient[http,grpc]>=2.50"] + cpu
dev = (build + images + plots + ["pytest>=7", "hypothesis>=6.100", "vermin>=1.6", "build", "nvidia-cuda-nvrtc>=13,<14"]
       + cuda + rtx + selftest + sign)

setup(
    name="jei-edge",
    version=version,
    description="Real early-exit speedups for JEI-DNN on edge hardware (CPU/onnxruntime, CUDA, TensorRT)",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # targets/ and calibration/ are top-level data folders of the repository; in the wheel they
    # become jei_edge/targets/ and jei_edge/calibration/ (found by jei_edge._data.data_dir)
    packages=find_packages(include=["jei_edge", "jei_edge.*"]) + ["jei_edge.targets", "jei_edge.calibration"],
    package_dir={"jei_edge.targets": "targets", "jei_edge.calibration": "calibration"},
    package_data={"jei_edge": ["runtime/cuda/*.cu"], "jei_edge.targets": ["*.toml"],
                  "jei_edge.calibration": ["*.toml"]},
    include_package_data=True,
    install_requires=["numpy>=1.22", "click>=8.0", "tomli>=1.1; python_version < '3.11'"],
    extras_require={"cpu": cpu, "build": build, "images": images, "plots": plots, "cuda": cuda,
                    "rtx": rtx, "selftest": selftest, "sign": sign, "serve": serve, "dev": dev, "all": build + images + plots + cuda},
    entry_points={"console_scripts": ["jei-edge=jei_edge.cli:main", "jei-edge-run=jei_edge.runtime.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "License :: OSI Approved :: Apache Software License"],
)
