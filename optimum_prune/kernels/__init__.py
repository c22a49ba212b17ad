"""2:4 sparse linear layers: the compressed format, its reference path, the Triton kernels
(``triton_24``, imported only when used), the sparse tensor-core kernel (``mma_24``, compiled only
when used), and ``sparsify``."""

from .format import Compressed24, compress, decompress
from .linear import SparseLinear, SparsifyReport, sparsify

__all__ = ["Compressed24", "SparseLinear", "SparsifyReport", "compress", "decompress", "sparsify"]
