"""The serving engine: token-level continuous batching of many tasks over one base model.

The data path, lowest first (each module imports only those above it in this list)::

    request.py      GenRequest / SamplingParams / TokenOut / OutputSink: the interface
    kv_cache.py     the KV memory the model reads and writes (a transformers Cache)
    sampling.py     per-row token choice and logprobs
    scheduler.py    which rows run this step (admission, prefill chunks, decode)
    runner.py       the model forwards of one step
    cuda_graphs.py  decode steps captured and replayed (CUDA)
    core.py         Engine: the step loop on its worker thread

The OpenAI front end (:mod:`prefixattn.serve.openai`) sits on top and only talks to
:class:`Engine` through :mod:`.request`.
"""

from .core import Engine, context_limit, eos_token_ids
from .request import GenRequest, OutputSink, QueueFullError, SamplingParams, TokenOut

__all__ = [
    "Engine",
    "GenRequest",
    "OutputSink",
    "QueueFullError",
    "SamplingParams",
    "TokenOut",
    "context_limit",
    "eos_token_ids",
]
