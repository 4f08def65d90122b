"""The FastAPI app: OpenAI-compatible completions over a :class:`TaskBank`.

Routes: ``POST /v1/completions`` (``model`` = a task, or the base model for no prefix),
``GET /v1/models``, ``GET /health``, ``GET /metrics``; with an admin token,
``POST /admin/tasks`` and ``DELETE /admin/tasks/{name}`` (``Authorization: Bearer``).
Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from ..hf.bank import TaskBank
from .cuda_graphs import buckets_up_to
from .engine import (
    CANCELLED,
    ERROR,
    Engine,
    GenRequest,
    QueueFullError,
    SamplingParams,
    context_limit,
    new_id,
    threadsafe_events,
)
from .request import TokenOut
from .schemas import AddTaskRequest, CompletionRequest

MAX_STOP = 4
MAX_PROMPTS = 64


class APIError(Exception):
    """An error answered with ``status`` and OpenAI's error body."""

    def __init__(
        self, status: int, message: str, code: str, param: str | None = None, kind: str = ""
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")


def _error_body(err: APIError) -> dict[str, Any]:
    return {
        "error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}
    }


class _TextSink:
    """The engine's :class:`~.request.OutputSink` for this app: decodes the row's tokens,
    cuts stop strings and forwards ``("delta", text)`` / ``("done", None)`` to ``on_event``.

    A stop-gap until the front end's output module (incremental detokenization) lands.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text, self.sent = "", 0
        self.on_event: Any = None

    def _emit(self, upto: int) -> None:
        if upto > self.sent and self.on_event is not None:
            self.on_event("delta", self.text[self.sent : upto])
        self.sent = max(self.sent, upto)

    def prompt_logprobs(self, outs: list[TokenOut | None]) -> None:
        pass  # this app does not ask for them

    def token(self, out: TokenOut) -> bool:
        self.ids.append(out.token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return True
        # text that a stop string could still swallow is held back
        self._emit(len(self.text) - max((len(s) - 1 for s in self.stop), default=0))
        return False

    def finish(self, reason: str, error: str | None = None) -> None:
        if reason == ERROR:
            self.text = error or "generation failed"
        else:
            self._emit(len(self.text))
        if self.on_event is not None:
            self.on_event("done", None)


def create_app(
    model: Any,
    tokenizer: Any,
    tasks: Mapping[str, Any] | None = None,
    *,
    model_name: str = "base",
    admin_token: str | None = None,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 512,
    max_queue: int = 256,
    kv_slots: int | None = None,
    max_model_len: int | None = None,
    cuda_graphs: bool = False,
    backend: str = "auto",
) -> FastAPI:
    """The serving app for one base model and a set of tasks.

    Arguments:
        model: a transformers decoder (patched here; it stays frozen).
        tokenizer: its tokenizer.
        tasks: ``{name: PrefixTuning | PromptTuning | saved tuner directory}``.
        model_name: the ``model`` value that means the base model without prefix.
        admin_token: enables the admin routes, which need ``Authorization: Bearer <token>``;
            None: no admin routes at all.
        max_num_seqs, max_num_batched_tokens, max_queue, kv_slots, max_model_len: see
            :class:`~prefixattn.serve.Engine`.
        cuda_graphs: decode steps padded to buckets up to ``max_num_seqs`` and replayed
            as CUDA graphs (on a CUDA model; see :mod:`prefixattn.serve.cuda_graphs`).
        backend: kernel backend of the bank.

    Returns:
        a FastAPI app; its lifespan starts and stops the batching worker. ``app.state``
        holds ``engine`` and ``bank``.
    """
    bank = TaskBank(model, backend=backend)
    bank.add_base(model_name)
    for name, tuner in (tasks or {}).items():
        if name == model_name:
            raise ValueError(f"tasks: the name {name!r} is the base model's model_name")
        bank.add(name, tuner)
    engine = Engine(
        bank, tokenizer, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, max_queue=max_queue,
        kv_slots=kv_slots, max_model_len=max_model_len,
        decode_buckets=buckets_up_to(max_num_seqs) if cuda_graphs else None,
    )  # fmt: skip
    limit = context_limit(model)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.drain(timeout=10.0)  # SIGTERM: finish the rows taken, refuse new ones

    app = FastAPI(title="prefixattn serve", lifespan=lifespan)
    app.state.engine, app.state.bank, app.state.model_name = engine, bank, model_name

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(_error_body(err), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            body = APIError(400, f"malformed JSON body: {errors[0].get('msg')}", "invalid_json")
            return JSONResponse(_error_body(body), status_code=400)
        parts = []
        for e in errors:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        first = errors[0].get("loc", ()) if errors else ()
        param = ".".join(str(x) for x in first if x != "body") or None
        body = APIError(422, "; ".join(parts), "invalid_value", param)
        return JSONResponse(_error_body(body), status_code=422)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "tasks": len(bank) - 1, "queue_depth": engine.queue_depth}

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        return engine.metrics()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        lengths, offsets = bank.lengths, bank.offsets
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "prefixattn",
                    "base": name == model_name,
                    "prefix_length": lengths[name],
                    "position_offset": offsets[name],
                }
                for name in bank.tasks
            ],
        }

    def _encode(body: CompletionRequest) -> list[GenRequest]:
        if body.model not in bank:
            raise APIError(
                404, f"model {body.model!r} is not served; served: {bank.tasks}",
                "model_not_found", "model",
            )  # fmt: skip
        n = getattr(body, "n", None)
        if n not in (None, 1):
            raise APIError(400, f"n must be 1 (got {n!r}); send a list of prompts", "n", "n")
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise APIError(
                400, f"prompt must hold 1 to {MAX_PROMPTS} prompts", "invalid_prompt", "prompt"
            )
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP or any(not s for s in stop):
            raise APIError(
                400, f"stop must be up to {MAX_STOP} non-empty strings", "invalid_stop", "stop"
            )
        offset = bank.offsets.get(body.model, 0)
        reqs = []
        for i, text in enumerate(prompts):
            ids = list(tokenizer(text)["input_ids"])
            if not ids:
                raise APIError(400, f"prompt {i} is empty after tokenization", "empty_prompt")
            if limit is not None and offset + len(ids) + body.max_tokens > limit:
                raise APIError(
                    400,
                    f"prompt {i} has {len(ids)} tokens; with max_tokens={body.max_tokens} "
                    f"(and the task's position offset {offset}) that exceeds the model's "
                    f"context of {limit} tokens",
                    "context_length_exceeded", "max_tokens",
                )  # fmt: skip
            params = SamplingParams(
                max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                seed=body.seed,
            )  # fmt: skip
            reqs.append(GenRequest(body.model, ids, params, _TextSink(tokenizer, tuple(stop))))
        return reqs

    def _submit(reqs: list[GenRequest], q: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        for i, r in enumerate(reqs):
            forward = threadsafe_events(loop, q)
            r.sink.on_event = lambda kind, text, i=i, forward=forward: forward(kind, (i, text))
        submitted = []
        try:
            for r in reqs:
                engine.submit(r)
                submitted.append(r)
        except QueueFullError as err:
            for r in submitted:
                engine.cancel(r)
            raise APIError(429, str(err), "queue_full", kind="rate_limit_error") from None

    def _usage(reqs: list[GenRequest]) -> dict[str, int]:
        p = sum(len(r.prompt_ids) for r in reqs)
        c = sum(len(r.out_ids) for r in reqs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _check_failed(reqs: list[GenRequest]) -> None:
        for r in reqs:
            if r.finish_reason == ERROR:
                status = 500 if r.sink.text.startswith("internal error") else 400
                raise APIError(status, r.sink.text, "generation_failed")

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        reqs = _encode(body)
        q: asyncio.Queue = asyncio.Queue()
        _submit(reqs, q)
        rid, now = new_id(), int(time.time())

        def chunk(i: int, text: str, reason: str | None) -> str:
            data = {
                "id": rid, "object": "text_completion", "created": now, "model": body.model,
                "choices": [
                    {"text": text, "index": i, "logprobs": None, "finish_reason": reason}
                ],
            }  # fmt: skip
            return f"data: {json.dumps(data)}\n\n"

        if body.stream:

            async def events() -> AsyncIterator[str]:
                left = len(reqs)
                try:
                    while left:
                        try:
                            kind, (i, text) = await asyncio.wait_for(q.get(), timeout=0.25)
                        except asyncio.TimeoutError:
                            # noticed even while nothing is sent (the row still queued)
                            if await request.is_disconnected():
                                return
                            continue
                        if kind == "delta":
                            yield chunk(i, text, None)
                        else:
                            left -= 1
                            r = reqs[i]
                            if r.finish_reason == ERROR:
                                err = {"error": {"message": r.sink.text, "type": "server_error"}}
                                yield f"data: {json.dumps(err)}\n\n"
                            else:
                                yield chunk(i, "", r.finish_reason)
                    yield "data: [DONE]\n\n"
                finally:  # the client went away (or we are done): free the rows
                    for r in reqs:
                        if not r.done:
                            engine.cancel(r)

            def cancel_rest() -> None:  # also when the client left before the first event
                for r in reqs:
                    if not r.done:
                        engine.cancel(r)

            return StreamingResponse(
                events(), media_type="text/event-stream", background=BackgroundTask(cancel_rest)
            )

        left = len(reqs)
        while left:
            try:
                kind, _ = await asyncio.wait_for(q.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    for r in reqs:
                        engine.cancel(r)
                    return Response(status_code=499)
                continue
            left -= kind == "done"
        _check_failed(reqs)
        return {
            "id": rid,
            "object": "text_completion",
            "created": now,
            "model": body.model,
            "choices": [
                {
                    "text": r.sink.text,
                    "index": i,
                    "logprobs": None,
                    "finish_reason": r.finish_reason if r.finish_reason != CANCELLED else None,
                    "token_ids": r.out_ids,
                }
                for i, r in enumerate(reqs)
            ],
            "usage": _usage(reqs),
        }

    if admin_token:

        def _authorize(authorization: str | None) -> None:
            want = f"Bearer {admin_token}"
            if authorization is None or not hmac.compare_digest(authorization, want):
                raise APIError(401, "admin routes need 'Authorization: Bearer <token>'",
                               "unauthorized", kind="authentication_error")  # fmt: skip

        @app.post("/admin/tasks", status_code=201)
        def add_task(
            body: AddTaskRequest, authorization: str | None = Header(None)
        ) -> dict[str, Any]:
            _authorize(authorization)
            if body.name == model_name:
                raise APIError(400, f"{model_name!r} is the base model", "reserved_name", "name")
            if not os.path.isdir(body.path):
                raise APIError(400, f"path {body.path!r} is not a directory", "bad_path", "path")
            try:
                with engine.model_lock:  # loading may run the model (soft prompts)
                    bank.add(body.name, body.path)
            except (ValueError, TypeError, OSError) as err:
                raise APIError(400, f"cannot load task {body.name!r}: {err}", "bad_artifact",
                               "path") from None  # fmt: skip
            return {"name": body.name, "prefix_length": bank.lengths[body.name],
                    "tasks": bank.tasks}  # fmt: skip

        @app.delete("/admin/tasks/{name}")
        def remove_task(name: str, authorization: str | None = Header(None)) -> dict[str, Any]:
            _authorize(authorization)
            if name == model_name:
                raise APIError(400, f"{model_name!r} is the base model", "reserved_name", "name")
            if name not in bank:
                raise APIError(404, f"no task {name!r}; tasks: {bank.tasks}", "task_not_found")
            bank.remove(name)  # queued requests for it fail in their batch, not the server
            return {"removed": name, "tasks": bank.tasks}

    return app


def load_base(spec: str, *, device: str = "cpu", dtype: Any = None) -> tuple[Any, Any, str]:
    """``(model, tokenizer, name)`` for ``prefixattn serve --model``.

    ``"tiny"``: a tiny random GPT-2 with the word-level tokenizer of
    :mod:`prefixattn.tiny` (seeded: the same weights each time; for tests and smoke
    runs). ``"smollm2"``: the demo's embedded SmolLM2-135M-Instruct. Anything else: a
    local model folder (see :func:`prefixattn.data.load_model`).
    """
    if spec == "tiny":
        from ..tiny import tiny_model, tiny_tokenizer

        tok = tiny_tokenizer()
        model = tiny_model(len(tok), arch="gpt2")
        if dtype is not None:
            model = model.to(dtype)
        return model.to(device), tok, "tiny"
    from ..data import load_model

    model, tok = load_model(spec, device=device, dtype=dtype)
    name = "smollm2" if spec == "smollm2" else os.path.basename(os.path.normpath(spec))
    return model, tok, name
