"""2:4 sparse linear layers: the compressed format, its reference path, and ``sparsify``."""

from .format import Compressed24, compress, decompress
from .linear import SparseLinear, SparsifyReport, sparsify

__all__ = ["Compressed24", "SparseLinear", "SparsifyReport", "compress", "decompress", "sparsify"]
