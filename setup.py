import re

from setuptools import find_packages, setup

with open("lineas_fast/_version.py", encoding="utf-8") as f:
    VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)

setup(
    name="lineas_fast",
    version=VERSION,
    description="Fast LinEAS activation steering: fused Triton kernels, lean trainer, weight folding",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # every subpackage of lineas_fast/ (training, fold, serve, apps, cli), and kernels/ installed
    # as lineas_fast.kernels
    packages=find_packages(include=["lineas_fast", "lineas_fast.*"]) + ["lineas_fast.kernels"],
    package_dir={"lineas_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.2,<3.10; platform_system == 'Linux'",
        "transformers>=4.46,<6",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "matplotlib>=3.7", "ruff>=0.6"],
        "diffusers": ["diffusers>=0.30"],
        "gguf": ["gguf>=0.10"],  # lf.fuse_gguf / lineas-fast fuse --gguf
        "demo": ["gguf>=0.10", "accelerate>=0.30", "alt-profanity-check>=1.5", "matplotlib>=3.7"],
    },
    entry_points={
        "console_scripts": ["lineas-fast=lineas_fast.cli:main"],
        # per-request steering in vLLM (lineas_fast/serve/vllm_plugin.py): inert unless
        # $LINEAS_FAST_STEERINGS names steerings
        "vllm.general_plugins": ["lineas_fast_steering=lineas_fast.serve.vllm_plugin:register"],
        "vllm.logits_processors": [
            "lineas_fast_steering=lineas_fast.serve.vllm_plugin:SteeringLogitsProcessor"
        ],
    },
)
