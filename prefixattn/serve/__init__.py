"""``prefixattn serve``: many task prefixes behind one OpenAI-compatible HTTP server.

Needs the ``serve`` extra (``pip install 'prefixattn[serve]'``: FastAPI, uvicorn, httpx).
:func:`create_app` builds the app for a base model and a set of tasks; :class:`Engine`
batches requests of any mix of tasks through one :class:`~prefixattn.TaskBank`.
"""

from .app import create_app, load_base
from .engine import Engine, GenRequest, QueueFullError

__all__ = ["Engine", "GenRequest", "QueueFullError", "create_app", "load_base"]
