"""The ``lookahead-bench`` command (also ``python -m lookahead_cuda.bench``)."""

from lookahead_cuda.bench.cli import main

__all__ = ["main"]
