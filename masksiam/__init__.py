"""masksiam: high-throughput self-supervised pretraining for ConvNets.

Importing any masksiam package first makes torchvision importable (see compat.py).
"""
from masksiam.compat import import_torchvision

import_torchvision()
__version__ = "0.1.0"
