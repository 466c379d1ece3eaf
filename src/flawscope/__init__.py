"""flawscope: visual anomaly detection for industrial inspection."""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "create_pipeline"]

if TYPE_CHECKING:  # what type checkers and editors see; at run time they are imported on first use
    from flawscope.pipeline import create_model, create_pipeline


def __getattr__(name: str):
    """``create_pipeline`` and ``create_model`` imported on first use: the CLI starts without torch,
    so that a Ctrl-C in its first second is one ``interrupted`` line, not a traceback from inside an import."""
    if name in ("create_model", "create_pipeline"):
        from flawscope import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'flawscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "create_model", "create_pipeline"})
