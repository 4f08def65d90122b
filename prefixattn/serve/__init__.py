"""``prefixattn serve``: many task prefixes behind one OpenAI-compatible HTTP server.

Needs the ``serve`` extra (``pip install 'prefixattn[serve]'``: FastAPI, uvicorn, httpx,
prometheus-client). :func:`create_app` builds the app for a base model and a set of tasks;
:class:`Engine` batches requests of any mix of tasks through one
:class:`~prefixattn.TaskBank`. The engine/front-end interface is :mod:`.engine.request`.

    prefixattn/serve/
      engine/   scheduler, KV cache, runner, sampling, CUDA graphs: the step loop
      task_registry.py   tasks loaded by name from a folder on first use (--task-dir), LRU
      openai/   protocol models, one serving class per endpoint, the thin router
"""

from .engine import Engine, GenRequest, OutputSink, QueueFullError, SamplingParams, TokenOut
from .openai import create_app, load_base
from .task_registry import TaskRegistry

__all__ = [
    "Engine",
    "GenRequest",
    "OutputSink",
    "QueueFullError",
    "SamplingParams",
    "TaskRegistry",
    "TokenOut",
    "create_app",
    "load_base",
]
