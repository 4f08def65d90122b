"""``POST /admin/tasks`` and ``DELETE /admin/tasks/{name}``: add and remove tasks while
serving. The admin token is checked by :class:`~prefixattn.serve.auth.BearerAuth` before
any of this runs (so an unauthenticated caller never sees body validation)."""

from __future__ import annotations

import json
import os
from typing import Any

from pydantic import ValidationError

from ...hf.task_store import read_task
from .errors import APIError, validation_message
from .protocol import AddTaskRequest
from .serving import ServeContext


def parse_add(raw: bytes) -> AddTaskRequest:
    """The add-task body, or a 400 / 422 in OpenAI's shape."""
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise APIError(400, f"malformed JSON body: {err}", "invalid_json") from None
    try:
        return AddTaskRequest.model_validate(data)
    except ValidationError as err:
        message, param = validation_message(list(err.errors()))
        raise APIError(422, message, "invalid_value", param) from None


def add_task(ctx: ServeContext, body: AddTaskRequest) -> dict[str, Any]:
    """Load ``body.path`` as task ``body.name`` (blocking: run it in a thread)."""
    if body.name == ctx.model_name:
        raise APIError(400, f"{ctx.model_name!r} is the base model", "reserved_name", "name")
    if not os.path.isdir(body.path):
        raise APIError(400, f"path {body.path!r} is not a directory", "bad_path", "path")
    try:
        art = read_task(body.path)  # the files, read with no lock held
        with ctx.engine.model_lock:  # adding may run the model (soft prompts)
            ctx.bank.add(body.name, art)
    except Exception as err:  # a corrupt artifact may fail in any library underneath
        raise APIError(
            400, f"cannot load task {body.name!r}: {type(err).__name__}: {err}",
            "bad_artifact", "path",
        ) from None  # fmt: skip
    return {"name": body.name, "prefix_length": ctx.bank.lengths[body.name],
            "tasks": ctx.bank.tasks}  # fmt: skip


def remove_task(ctx: ServeContext, name: str) -> dict[str, Any]:
    """Remove task ``name``; requests already queued for it get 404."""
    if name == ctx.model_name:
        raise APIError(400, f"{ctx.model_name!r} is the base model", "reserved_name", "name")
    if name not in ctx.bank:
        raise APIError(404, f"no task {name!r}; tasks: {ctx.bank.tasks}", "task_not_found")
    try:
        ctx.bank.remove(name)
    except ValueError:  # removed meanwhile by another call
        raise APIError(
            404, f"no task {name!r}; tasks: {ctx.bank.tasks}", "task_not_found"
        ) from None
    return {"removed": name, "tasks": ctx.bank.tasks}
