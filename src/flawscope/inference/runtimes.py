"""Importing the deployment runtimes without their telemetry: flawscope works offline and sends nothing.

OpenVINO reports every import to Google Analytics through ``openvino_telemetry`` (by default, unless
the user opted out), from a process it forks in a background thread: besides sending, that fork can
hang the caller (a child stuck on a resolver lock another thread held). ONNX Runtime (1.2x, on Linux
too) records usage events under ``~/.cache/Microsoft`` from its import on, unless
``ORT_DISABLE_TELEMETRY`` is set first.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType


def import_runtime(name: str) -> ModuleType:
    """``onnxruntime`` or ``openvino``, imported with telemetry off. Where the caller imported it
    before, ONNX Runtime's events are turned off from here on; OpenVINO's import has reported already."""
    if name == "onnxruntime":
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        module = importlib.import_module(name)
        module.disable_telemetry_events()
        return module
    if name in sys.modules:
        return sys.modules[name]
    # Hidden while OpenVINO imports, its tools take their own stub (their ImportError fallback); put
    # back after, so that importing it stays the caller's choice.
    hidden = sys.modules.get("openvino_telemetry")
    sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        return importlib.import_module(name)
    finally:
        if hidden is None:
            del sys.modules["openvino_telemetry"]
        else:
            sys.modules["openvino_telemetry"] = hidden
