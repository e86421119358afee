"""masksiam: high-throughput self-supervised pretraining for ConvNets.

Importing masksiam makes torchvision importable (see compat.py): the first `import torchvision`
applies the CPU-torch shim where it is needed. Interpreter start-up imports this package in the
environment `make install` builds, so it imports nothing beyond the standard library.
"""
from masksiam.compat import install_hook

install_hook()
__version__ = "0.1.0"
