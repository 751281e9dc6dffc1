"""Lookahead for PyTorch with fused CPU (OpenMP) and CUDA kernels.

``Lookahead`` wraps any ``torch.optim.Optimizer``; ``lookahead_update_`` is the fused op behind it.
"""

from lookahead_cuda.ops import build_info, lookahead_update_
from lookahead_cuda.optimizer import Lookahead
from lookahead_cuda.ranger import Ranger
from lookahead_cuda.schedules import CosineAlpha, LambdaAlpha, LookaheadScheduler

__all__ = [
    "CosineAlpha",
    "LambdaAlpha",
    "Lookahead",
    "LookaheadScheduler",
    "Ranger",
    "build_info",
    "lookahead_update_",
]
__version__ = "0.1.0"
