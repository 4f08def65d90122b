"""``prefixattn serve``: many task prefixes behind one OpenAI-compatible HTTP server.

Needs the ``serve`` extra (``pip install 'prefixattn[serve]'``: FastAPI, uvicorn, httpx,
prometheus-client). :func:`create_app` builds the app for a base model and a set of tasks;
:class:`Engine` batches requests of any mix of tasks through one
:class:`~prefixattn.TaskBank`. The engine/front-end interface is :mod:`.request`.
"""

from .app import create_app, load_base
from .engine import Engine
from .request import GenRequest, OutputSink, QueueFullError, SamplingParams, TokenOut

__all__ = [
    "Engine",
    "GenRequest",
    "OutputSink",
    "QueueFullError",
    "SamplingParams",
    "TokenOut",
    "create_app",
    "load_base",
]
