"""GPU benchmarks (results in BENCHMARKS.md)."""
from configs import model_config

__all__ = ["model_config"]
