"""The OpenAI-compatible HTTP front end (vLLM's ``entrypoints/openai`` layout).

protocol.py            request bodies (pydantic), the fields we refuse by name
errors.py, auth.py     OpenAI's error shape, bearer tokens
metrics.py             Prometheus metrics
output.py              tokens -> text: incremental detokenization, stop strings, logprobs
serving.py             OpenAIServing, the base of the endpoint classes; ServeContext
serving_completion.py  POST /v1/completions
serving_chat.py        POST /v1/chat/completions
serving_models.py      GET /v1/models, /tokenize, /detokenize
admin.py               /admin/tasks
api_server.py          create_app: the thin FastAPI router over the classes above
"""

from .api_server import create_app, load_base
from .serving import RequestLimits

__all__ = ["RequestLimits", "create_app", "load_base"]
