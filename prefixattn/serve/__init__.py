"""``prefixattn serve``: many task prefixes behind one OpenAI-compatible HTTP server.

Needs the ``serve`` extra (``pip install 'prefixattn[serve]'``: FastAPI, uvicorn, httpx,
prometheus-client). :func:`create_app` builds the app for a base model and a set of tasks;
:class:`Engine` batches requests of any mix of tasks through one
:class:`~prefixattn.TaskBank`. The engine/front-end interface is :mod:`.engine.request`.

    prefixattn/serve/
      engine/   scheduler, KV cache, runner, sampling, CUDA graphs: the step loop
      task_registry.py   tasks loaded by name from a folder on first use (--task-dir), LRU
      openai/   protocol models, one serving class per endpoint, the thin router

Names are imported on first use: ``prefixattn.serve.engine.config`` (the engine's options,
which the command line reads to build its parser) imports without the serve extra.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module that defines it
_LAZY = {
    "Engine": "prefixattn.serve.engine.core",
    "EngineConfig": "prefixattn.serve.engine.config",
    "GenRequest": "prefixattn.serve.engine.request",
    "OutputSink": "prefixattn.serve.engine.request",
    "QueueFullError": "prefixattn.serve.engine.request",
    "SamplingParams": "prefixattn.serve.engine.request",
    "TokenOut": "prefixattn.serve.engine.request",
    "TaskRegistry": "prefixattn.serve.task_registry",
    "create_app": "prefixattn.serve.openai.api_server",
    "load_base": "prefixattn.serve.openai.api_server",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prefixattn.serve' has no attribute {name!r}")
