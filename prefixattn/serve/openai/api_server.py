"""The FastAPI app: a thin router over the serving classes (vLLM's OpenAI server layout).

Inference routes (``--api-key``): ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /tokenize``, ``POST /detokenize``,
``GET /metrics.json`` (it names every task). Open: ``GET /health``, ``GET /metrics``
(Prometheus text, as vLLM's). With an admin token: ``POST /admin/tasks``,
``DELETE /admin/tasks/{name}``. Every error is in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ...hf.bank import TaskBank
from ..engine.config import EngineConfig, merge_overrides, with_cuda_graphs
from ..engine.core import Engine, context_limit, eos_token_ids
from ..task_registry import TaskRegistry
from . import admin
from .auth import BearerAuth
from .errors import BodyLimit, install_error_handlers
from .metrics import CONTENT_TYPE, ServeMetrics
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .serving import RequestLimits, ServeContext
from .serving_chat import OpenAIServingChat
from .serving_completion import OpenAIServingCompletion
from .serving_models import OpenAIServingModels

MAX_BODY_BYTES = 8 * 1024 * 1024
TASK_NAME = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def check_task_name(name: str) -> str:
    """``name`` if it can be a task's name (it must fit in one URL path segment).

    Raises:
        ValueError: a name with other characters than letters, digits, ``._:-``.
    """
    if not isinstance(name, str) or not TASK_NAME.match(name):
        raise ValueError(f"task name {name!r}: use 1 to 128 letters, digits, '.', '_', ':' or '-'")
    return name


def engine_config(
    config: EngineConfig | None, overrides: Mapping[str, Any], *, cuda_graphs: bool = False
) -> EngineConfig:
    """The engine options of :func:`create_app`: ``config`` with ``overrides`` (EngineConfig
    fields); ``cuda_graphs``: ``decode_buckets`` = powers of two up to ``max_num_seqs``.

    Raises:
        TypeError: an override that is not an EngineConfig field (named).
        ValueError: ``cuda_graphs=True`` with ``decode_buckets`` given, or a value out of
            range (naming the field).
    """
    if not isinstance(cuda_graphs, bool):
        raise ValueError(f"cuda_graphs must be a bool, got {cuda_graphs!r}")
    cfg = merge_overrides(config, overrides, caller="create_app")
    return with_cuda_graphs(cfg) if cuda_graphs else cfg


def create_app(
    model: Any,
    tokenizer: Any,
    tasks: Mapping[str, Any] | None = None,
    *,
    engine: EngineConfig | None = None,
    model_name: str = "base",
    admin_token: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    backend: str = "auto",
    task_dir: str | os.PathLike | None = None,
    max_loaded_tasks: int = 64,
    limits: RequestLimits | None = None,
    cuda_graphs: bool = False,
    **engine_overrides: Any,
) -> FastAPI:
    """The serving app for one base model and a set of tasks.

    Arguments:
        model: a transformers decoder (patched here; it stays frozen).
        tokenizer: its tokenizer (its chat template, if any, serves the chat route).
        tasks: ``{name: PrefixTuning | PromptTuning | saved tuner directory}``.
        engine: the serving engine's options (:class:`~prefixattn.serve.EngineConfig`:
            ``max_num_seqs``, ``max_num_batched_tokens``, ``max_queue``, the paged KV cache,
            ``compile``, ``cpu_linear``, ...); None: the defaults.
        model_name: the ``model`` value that means the base model without prefix.
        admin_token: enables the admin routes, which need ``Authorization: Bearer <token>``;
            None: no admin routes at all.
        api_key: the inference routes need ``Authorization: Bearer <api_key>``; None: open.
        max_body_bytes: larger request bodies get 413.
        backend: kernel backend of the bank.
        task_dir: a folder of tasks (one sub-directory each, any saved-tuner format): a
            request's ``model`` NAME not in ``tasks`` loads ``task_dir/NAME`` on first use
            (see :mod:`prefixattn.serve.task_registry`); ``tasks`` stay pinned.
        max_loaded_tasks: tasks from ``task_dir`` kept loaded at once (least recently
            used evicted; a task with requests in flight never is).
        limits: what one request may ask for (stop strings, prompts, ``n``; see
            :class:`~prefixattn.serve.openai.serving.RequestLimits`); None: the defaults.
        cuda_graphs: the engine's ``decode_buckets`` = powers of two up to
            ``max_num_seqs`` (decode steps replayed as CUDA graphs on a CUDA model; see
            :mod:`prefixattn.serve.engine.cuda_graphs`); an error with ``decode_buckets``.
        **engine_overrides: :class:`~prefixattn.serve.EngineConfig` fields, winning over
            ``engine``'s (``create_app(model, tok, max_num_seqs=4)``: the engine options
            this function took as keywords before the config keep working).

    Returns:
        a FastAPI app; its lifespan starts and stops the batching worker. ``app.state``
        holds ``engine`` (its options: ``app.state.engine.config``), ``bank``,
        ``model_name``, ``metrics`` and ``tasks`` (the
        :class:`~prefixattn.serve.task_registry.TaskRegistry`, None without ``task_dir``).

    Raises:
        TypeError: a keyword that is neither an argument here nor an EngineConfig field
            (named).
        ValueError: a value out of range (naming it); ``cuda_graphs=True`` with
            ``decode_buckets`` given.
    """
    config = engine_config(engine, engine_overrides, cuda_graphs=cuda_graphs)
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    for name in tasks or {}:
        check_task_name(name)
    bank = TaskBank(model, backend=backend)
    bank.add_base(model_name)
    for name, tuner in (tasks or {}).items():
        if name == model_name:
            raise ValueError(f"tasks: the name {name!r} is the base model's model_name")
        bank.add(name, tuner)
    eng = Engine(bank, tokenizer, config)
    registry = None
    if task_dir is not None:
        registry = TaskRegistry(bank, eng, task_dir, max_loaded=max_loaded_tasks)
    ctx = ServeContext(
        engine=eng, bank=bank, tokenizer=tokenizer, model_name=model_name,
        metrics=ServeMetrics(eng), limit=context_limit(model),
        vocab_size=model.get_input_embeddings().num_embeddings,
        eos_ids=eos_token_ids(model, tokenizer), tasks=registry,
        limits=limits or RequestLimits(),
    )  # fmt: skip
    if registry is not None:
        ctx.metrics.watch_tasks(registry.stats)
    completion, chat = OpenAIServingCompletion(ctx), OpenAIServingChat(ctx)
    models = OpenAIServingModels(ctx)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng.start()
        try:
            yield
        finally:
            eng.drain(timeout=10.0)  # SIGTERM: finish the rows taken, refuse new ones
            ctx.pool.shutdown(wait=False, cancel_futures=True)
            if registry is not None:
                registry.close()

    app = FastAPI(title="prefixattn serve", lifespan=lifespan)
    app.state.engine, app.state.bank, app.state.model_name = eng, bank, model_name
    app.state.metrics, app.state.tasks = ctx.metrics, registry
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(BearerAuth, api_key=api_key, admin_token=admin_token)  # runs first

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "tasks": len(bank) - 1, "queue_depth": eng.queue_depth}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/metrics.json")
    async def metrics_json() -> dict[str, Any]:
        out = eng.metrics()
        if registry is not None:  # tasks loaded on demand (--task-dir)
            out["task_store"] = registry.stats()
        return out

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return models.list()

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        return models.retrieve(model_id)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await completion.create(body, request)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await chat.create(body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return await models.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return await models.detokenize(body)

    if admin_token:

        @app.post("/admin/tasks", status_code=201)
        async def add_task(request: Request) -> dict[str, Any]:
            body = admin.parse_add(await request.body())  # after BearerAuth's token check
            return await run_in_threadpool(admin.add_task, ctx, body)

        @app.delete("/admin/tasks/{name:path}")
        async def remove_task(name: str) -> dict[str, Any]:
            return admin.remove_task(ctx, name)

    return app


def load_base(spec: str, *, device: str = "cpu", dtype: Any = None) -> tuple[Any, Any, str]:
    """``(model, tokenizer, name)`` for ``prefixattn serve --model``.

    ``"tiny"``: a tiny random GPT-2 with the word-level tokenizer of
    :mod:`prefixattn.tiny` (seeded: the same weights each time; for tests and smoke
    runs). ``"smollm2"``: the demo's embedded SmolLM2-135M-Instruct. Anything else: a
    local model folder (see :func:`prefixattn.data.load_model`).
    """
    if spec == "tiny":
        from ...tiny import tiny_model, tiny_tokenizer

        tok = tiny_tokenizer()
        model = tiny_model(len(tok), arch="gpt2")
        if dtype is not None:
            model = model.to(dtype)
        return model.to(device), tok, "tiny"
    from ...data import load_model

    model, tok = load_model(spec, device=device, dtype=dtype)
    name = "smollm2" if spec == "smollm2" else os.path.basename(os.path.normpath(spec))
    return model, tok, name
