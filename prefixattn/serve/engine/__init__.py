"""The serving engine: token-level continuous batching of many tasks over one base model.

The data path, lowest first (each module imports only those above it in this list)::

    config.py       EngineConfig: every option of the engine (pure Python)
    request.py      GenRequest / SamplingParams / TokenOut / OutputSink: the interface
    kv_cache.py     the paged KV memory the model reads and writes (a transformers Cache)
    block_pool.py   block ids: free queue, ref counts, prefix-cache hashes
    cpu_linear.py   the model's linear layers over oneDNN-prepacked weights (CPU)
    sampling.py     per-row token choice and logprobs
    kv_cache_manager.py  which blocks each row holds (allocation, prefix-cache hits)
    scheduler.py    which rows run this step (admission by free blocks, prefill chunks,
                    decode, preemption)
    runner.py       the model forwards of one step
    cuda_graphs.py  decode steps captured and replayed (CUDA)
    compiled.py     decode steps compiled by torch.compile per shape bucket
    core.py         Engine: the step loop on its worker thread

The OpenAI front end (:mod:`prefixattn.serve.openai`) sits on top and only talks to
:class:`Engine` through :mod:`.request`. Names are imported on first use (``.config``
needs neither torch nor transformers).
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module that defines it
_LAZY = {
    "Engine": "prefixattn.serve.engine.core",
    "context_limit": "prefixattn.serve.engine.core",
    "eos_token_ids": "prefixattn.serve.engine.core",
    "EngineConfig": "prefixattn.serve.engine.config",
    "GenRequest": "prefixattn.serve.engine.request",
    "OutputSink": "prefixattn.serve.engine.request",
    "QueueFullError": "prefixattn.serve.engine.request",
    "SamplingParams": "prefixattn.serve.engine.request",
    "TokenOut": "prefixattn.serve.engine.request",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prefixattn.serve.engine' has no attribute {name!r}")
