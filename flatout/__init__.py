"""flatout: an LLM inference server that runs the GPU flat out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["LLM", "CompletionOutput", "EngineArgs", "RequestOutput", "SamplingParams"]

if TYPE_CHECKING:
    __version__: str
    from flatout.config import EngineArgs
    from flatout.engine.outputs import CompletionOutput, RequestOutput
    from flatout.llm import LLM
    from flatout.sampling_params import SamplingParams

_WHERE = {
    "LLM": "flatout.llm",
    "EngineArgs": "flatout.config",
    "CompletionOutput": "flatout.engine.outputs",
    "RequestOutput": "flatout.engine.outputs",
    "SamplingParams": "flatout.sampling_params",
}


def __getattr__(name: str) -> Any:
    # imported on first use, so the pure-Python parts (scheduler, block manager) load without
    # torch and the command line starts fast
    if name == "__version__":
        global __version__
        __version__ = _installed_version()
        return __version__
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'flatout' has no attribute {name!r}")


def _installed_version() -> str:
    """The version pyproject.toml gives, as installed (`pip install` / `pip install -e`)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flatout")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return "0+unknown"
