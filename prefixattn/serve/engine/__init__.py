"""The serving engine: token-level continuous batching of many tasks over one base model.

The data path, lowest first (each module imports only those above it in this list)::

    request.py      GenRequest / SamplingParams / TokenOut / OutputSink: the interface
    kv_cache.py     the paged KV memory the model reads and writes (a transformers Cache)
    block_pool.py   block ids: free queue, ref counts, prefix-cache hashes
    sampling.py     per-row token choice and logprobs
    kv_cache_manager.py  which blocks each row holds (allocation, prefix-cache hits)
    scheduler.py    which rows run this step (admission by free blocks, prefill chunks,
                    decode, preemption)
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
