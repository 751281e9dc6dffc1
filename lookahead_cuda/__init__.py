"""Lookahead for PyTorch with fused CPU (OpenMP) and CUDA kernels.

``Lookahead`` wraps any ``torch.optim.Optimizer``; ``lookahead_update_`` is the fused op behind it.
"""

from lookahead_cuda.ops import build_info, lookahead_update_
from lookahead_cuda.optimizer import Lookahead

__all__ = ["Lookahead", "build_info", "lookahead_update_"]
__version__ = "0.1.0"
