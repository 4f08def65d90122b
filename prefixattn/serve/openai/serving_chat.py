"""``POST /v1/chat/completions``: the messages through the tokenizer's chat template, then
the same rows as completions; OpenAI's chat shapes (message, delta chunks, logprobs)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ..engine.request import ERROR
from .errors import APIError
from .output import chat_logprobs
from .protocol import ChatCompletionRequest, ChatMessage
from .serving import Choice, OpenAIServing, ServeContext, new_id, sse


def chat_prompt_ids(
    ctx: ServeContext, messages: list[ChatMessage], add_generation_prompt: bool
) -> list[int]:
    """The token ids of ``messages`` through the tokenizer's chat template (blocking).

    Raises:
        APIError: 400 when the tokenizer has no chat template or the template fails.
    """
    tok = ctx.tokenizer
    if not getattr(tok, "chat_template", None):
        raise APIError(
            400, "this model's tokenizer has no chat template: use /v1/completions",
            "no_chat_template", "messages",
        )  # fmt: skip
    try:
        text = tok.apply_chat_template(
            [m.as_template_input() for m in messages], tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )  # fmt: skip
    except Exception as err:  # a template may raise anything (jinja's own errors)
        raise APIError(400, f"the chat template failed: {err}", "chat_template_error",
                       "messages") from None  # fmt: skip
    # the template writes the special tokens (BOS, ...) itself
    return list(tok(text, add_special_tokens=False)["input_ids"])


class OpenAIServingChat(OpenAIServing):
    """The chat completions endpoint."""

    async def _create(self, body: ChatCompletionRequest, request: Request, task: str) -> Any:
        self.check_fields(body)
        self.check_rows(1, body.n)
        ids = await self.off_loop(
            chat_prompt_ids, self.ctx, body.messages, body.add_generation_prompt
        )
        self.check_token_ids(ids, "messages")
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:  # the rest of the context
            cap = self.ctx.max_len(task)
            max_tokens = max(cap - len(ids), 1) if cap is not None else 256
        self.check_context(task, len(ids), max_tokens)
        k = (body.top_logprobs or 0) if body.logprobs else None
        rows, q = self.make_rows(task, [ids], body, [max_tokens], logprobs=k)
        self.submit(rows)
        rid, now = new_id("chatcmpl"), int(time.time())
        if body.stream:
            return StreamingResponse(
                self._stream(body, request, rows, q, rid, now), media_type="text/event-stream"
            )
        if not await self.collect(rows, q, request):
            return Response(status_code=499)  # the client went away
        choices = [
            {
                "index": r.index,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": chat_logprobs(r.logprobs) if k is not None else None,
                "finish_reason": self.finish_reason(r),
            }
            for r in rows
        ]
        return {
            "id": rid, "object": "chat.completion", "created": now, "model": body.model,
            "choices": choices, "usage": self.usage(rows),
        }  # fmt: skip

    async def _stream(
        self, body: ChatCompletionRequest, request: Request, rows: list[Choice], q: Any,
        rid: str, now: int,
    ) -> AsyncIterator[str]:  # fmt: skip
        usage_chunks = bool(body.stream_options and body.stream_options.include_usage)
        want_lp = body.logprobs

        def chunk(row: Choice, delta: dict, entries: list | None, reason: str | None) -> str:
            lp = chat_logprobs(entries) if want_lp and entries else None
            data: dict[str, Any] = {
                "id": rid, "object": "chat.completion.chunk", "created": now,
                "model": body.model,
                "choices": [{"index": row.index, "delta": delta, "logprobs": lp,
                             "finish_reason": reason}],
            }  # fmt: skip
            if usage_chunks:
                data["usage"] = None
            return sse(data)

        for row in rows:
            yield chunk(row, {"role": "assistant", "content": ""}, None, None)
        async for row, ev in self.events(rows, q, request):
            if ev.kind == "delta":
                if ev.text or (want_lp and ev.logprobs):
                    yield chunk(row, {"content": ev.text}, ev.logprobs, None)
            elif ev.kind == "finish":
                if ev.reason == ERROR:
                    yield sse(self.row_error(row).body())
                    continue
                if ev.text:
                    yield chunk(row, {"content": ev.text}, None, None)
                yield chunk(row, {}, None, self.finish_reason(row))
        head = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": body.model}
        for line in self.stream_end(rows, head, usage_chunks):
            yield line
