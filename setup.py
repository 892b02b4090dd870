"""diffloss_fast: DiffLoss (ACCV 2024) for image restoration, computed fast and lean.

torch is required but never pinned here: a pin would replace a user's CUDA build. On a
CPU-only machine install the CPU build first (see the README's quick start).
"""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent

setup(
    name="diffloss-fast",
    version="0.1.0",
    description="DiffLoss: a diffusion-prior loss for image restoration, with fused kernels",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["diffloss_fast", "diffloss_fast.*"]) + ["diffloss_fast.csrc"],
    # csrc/ stays at the top level of the repository and ships inside the package.
    package_dir={"diffloss_fast.csrc": "csrc"},
    package_data={"diffloss_fast.csrc": ["*.cpp", "*.cu", "*.h", "*.md"],
                  # the convolution dispatch table the GPU sweep writes
                  "diffloss_fast.ops": ["conv_dispatch.json"]},
    install_requires=[
        "torch>=2.1",
        "guided-diffusion-sdk>=1.0",
        "numpy",
        "safetensors",
        "tqdm",
        "matplotlib",
        "nvidia-ml-py",
        "pillow",
        "scikit-image",
        'triton>=3.0; platform_system == "Linux"',
    ],
    extras_require={
        "xformers": ["xformers"],
        "test": ["pytest>=7", "pytest-benchmark>=4", "ninja"],
    },
    entry_points={"console_scripts": ["diffloss-fast = diffloss_fast.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: "
                 "Artificial Intelligence"],
)
