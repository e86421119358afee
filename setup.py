"""masksiam: high-throughput self-supervised pretraining for ConvNets.

Install with `make install` (pins torch for this machine, makes torchvision importable on CPU torch,
installs DALI and FFCV). `pip install -e .` alone declares the same dependencies, unpinned.
"""
from setuptools import setup

setup(
    name="masksiam",
    version="0.1.0",
    description="High-throughput self-supervised pretraining for ConvNets: DALI/FFCV loaders, "
                "batched GPU augmentation and masking, SimCLR/MoCo/BYOL/SimSiam/Barlow/VICReg/MIM",
    python_requires=">=3.10",
    packages=["masksiam", "pipelines", "pipelines.loaders", "pipelines.augment", "pipelines.tools",
              "models", "losses", "eval", "bench"],
    package_data={"pipelines.augment": ["recipes/*.yaml"]},
    py_modules=["train", "convert"],      # bench.py: the script of package bench (same name: not a module)
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "psutil",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "ffcv": ["ffcv==1.0.2", "numba", "opencv-python"],
        "test": ["pytest", "scikit-image"],
    },
)
