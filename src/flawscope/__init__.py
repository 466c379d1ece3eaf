"""flawscope: visual anomaly detection for industrial inspection."""

__version__ = "0.1.0"

from flawscope.pipeline import create_pipeline  # noqa: E402

__all__ = ["__version__", "create_pipeline"]
