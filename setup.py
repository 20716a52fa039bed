"""keras_metapt: meta-learn pre-training hyperparameters with hypergradients (Keras 3, TF)."""

import pathlib

from setuptools import find_packages, setup

here = pathlib.Path(__file__).parent

setup(
    name="keras_metapt",
    version="0.1.0",
    description="Hypergradients for meta-learning pre-training hyperparameters in Keras 3 / TensorFlow",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["keras_metapt", "keras_metapt.*"]),
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<4",
        "absl-py>=2.1",
        "tensorboard>=2.21,<2.22",
        "tensorflow-datasets>=4.9.10",
        "importlib_resources",
        "numpy>=1.26",
        "scipy>=1.11",
        "matplotlib>=3.8",
        "rdkit>=2024.3",
        "wfdb>=4.1",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "scikit-learn>=1.4",
                 "tensorflow-serving-api>=2.21,<2.22", "dehb==0.1.1", "distributed>=2024.1",
                 "keras-tuner>=1.4"],
        # gradient-free baselines of benchmarks.long_horizon (dehb 0.1.2 pins numpy < 2;
        # distributed: DEHB's Dask workers, --dehb_workers / --dask_scheduler)
        "benchmarks": ["dehb==0.1.1", "distributed>=2024.1", "keras-tuner>=1.4"],
        "examples": ["scikit-learn>=1.4"],
    },
)
