"""himae-nnunet: Hi-End-MAE self-supervised pretraining for nnU-Net v2.

`pretrain/` and `trainers/` are top-level folders of the repository but install as
`himae_nnunet.pretrain` and `himae_nnunet.trainers` (no generic top-level packages); work on a source
checkout through `pip install -e .`.
"""
import re
from pathlib import Path

from setuptools import setup

version = re.search(r'__version__ = "([^"]+)"', Path("himae_nnunet/core/version.py").read_text()).group(1)

setup(
    name="himae-nnunet",
    version=version,
    description="Hi-End-MAE pretraining (hierarchical encoder-driven MAE) and UNETR fine-tuning inside nnU-Net v2",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=[
        "himae_nnunet",
        "himae_nnunet.core",
        "himae_nnunet.scans",
        "himae_nnunet.models",
        "himae_nnunet.checkpoint",
        "himae_nnunet.vit_plans",
        "himae_nnunet.analysis",
        "himae_nnunet.demo",
        "himae_nnunet.evidence",
        "himae_nnunet.pretrain",
        "himae_nnunet.trainers",
        "himae_nnunet.trainers.ext",
    ],
    package_dir={
        "himae_nnunet": "himae_nnunet",
        "himae_nnunet.pretrain": "pretrain",
        "himae_nnunet.trainers": "trainers",
        "himae_nnunet.trainers.ext": "trainers/ext",
    },
    install_requires=[
        "torch>=2.1",
        "nnunetv2>=2.8.1,<2.9",
        "dynamic-network-architectures",
        "batchgenerators",
        "batchgeneratorsv2",
        "acvl_utils",  # imported by the paper protocol (nnU-Net depends on it too)
        "threadpoolctl",
        "SimpleITK",
        "numpy",
        "scipy",
        "blosc2",
        "timm>=1.0,<1.1",  # tested with 1.0.22
        "tqdm",
        "matplotlib",
    ],
    extras_require={"test": ["pytest", "tensorboard"], "tensorboard": ["tensorboard"]},
    entry_points={"console_scripts": ["himae-nnunet = himae_nnunet.cli:main"]},
)
