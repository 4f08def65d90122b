"""``POST /v1/completions``: OpenAI's completions (text or token-id prompts, ``n``,
``logprobs``, ``echo``, stop strings and token ids, streaming with usage)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ..engine.request import ERROR
from .output import completion_logprobs
from .protocol import CompletionRequest
from .serving import Choice, OpenAIServing, new_id, sse


def _is_ids(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], int)


class OpenAIServingCompletion(OpenAIServing):
    """The completions endpoint."""

    async def prompts(
        self, body: CompletionRequest, task: str
    ) -> tuple[list[list[int]], list[str | None]]:
        """(token ids, text or None) of each prompt, every limit checked: the rows
        (prompts x ``n``) first, then each token-id prompt as a whole (its length, then
        its ids' range in one pass), then the text prompts, tokenized off the event loop
        in one job."""
        p = body.prompt
        items: list[Any] = [p] if isinstance(p, str) or _is_ids(p) else list(p)
        self.check_rows(len(items), body.n)
        texts = [x if isinstance(x, str) else None for x in items]
        for i, (t, x) in enumerate(zip(texts, items)):
            if t is None:
                self.check_context(task, len(x), body.max_tokens, i)
        for t, x in zip(texts, items):
            if t is None:
                self.check_token_ids(x, "prompt")
        to_encode = [t for t in texts if t is not None]
        tok = self.ctx.tokenizer
        encoded = iter(
            await self.off_loop(lambda: [list(tok(t)["input_ids"]) for t in to_encode])
            if to_encode
            else []
        )
        ids = [next(encoded) if t is not None else list(x) for t, x in zip(texts, items)]
        for i, (t, row) in enumerate(zip(texts, ids)):
            if t is not None:
                self.check_context(task, len(row), body.max_tokens, i)
        return ids, texts

    async def _create(self, body: CompletionRequest, request: Request, task: str) -> Any:
        self.check_fields(body)
        ids, texts = await self.prompts(body, task)
        k = body.logprobs
        rows, q = self.make_rows(
            task, ids, body, [body.max_tokens] * len(ids), logprobs=k,
            prompt_logprobs=k if body.echo else None,
        )  # fmt: skip
        echo = [""] * len(ids)
        if body.echo:  # token-id prompts are decoded on the tokenizer's thread
            tok = self.ctx.tokenizer
            echo = await self.off_loop(
                lambda: [t if t is not None else tok.decode(i) for t, i in zip(texts, ids)]
            )
        self.submit(rows)
        rid, now = new_id(), int(time.time())
        if body.stream:
            return StreamingResponse(
                self._stream(body, request, rows, q, rid, now, echo),
                media_type="text/event-stream",
            )
        if not await self.collect(rows, q, request):
            return Response(status_code=499)  # the client went away
        choices = []
        for r in rows:
            text, lp = echo[r.prompt_index] + r.text, None
            if k is not None:
                lp = completion_logprobs((r.prompt_logprobs or []) + r.logprobs)
            choices.append({
                "index": r.index, "text": text, "logprobs": lp,
                "finish_reason": self.finish_reason(r), "token_ids": r.token_ids,
            })  # fmt: skip
        return {
            "id": rid, "object": "text_completion", "created": now, "model": body.model,
            "choices": choices, "usage": self.usage(rows),
        }  # fmt: skip

    async def _stream(
        self, body: CompletionRequest, request: Request, rows: list[Choice], q: Any,
        rid: str, now: int, echo: list[str],
    ) -> AsyncIterator[str]:  # fmt: skip
        usage_chunks = bool(body.stream_options and body.stream_options.include_usage)
        k = body.logprobs
        offsets = [0] * len(rows)  # text_offset of the next token, per row

        def chunk(row: Choice, text: str, entries: list | None, reason: str | None) -> str:
            lp = None
            if k is not None and entries is not None:
                lp = completion_logprobs(entries, offsets[row.index])
                offsets[row.index] += sum(len(e.token) for e in entries if e is not None)
            data: dict[str, Any] = {
                "id": rid, "object": "text_completion", "created": now, "model": body.model,
                "choices": [{"index": row.index, "text": text, "logprobs": lp,
                             "finish_reason": reason}],
            }  # fmt: skip
            if usage_chunks:
                data["usage"] = None
            return sse(data)

        if body.echo and k is None:  # the prompt's text first (with logprobs: on its event)
            for row in rows:
                yield chunk(row, echo[row.prompt_index], None, None)
        async for row, ev in self.events(rows, q, request):
            if ev.kind == "prompt":
                yield chunk(row, echo[row.prompt_index], ev.logprobs or [], None)
            elif ev.kind == "delta":
                if ev.text or (k is not None and ev.logprobs):
                    yield chunk(row, ev.text, ev.logprobs, None)
            elif ev.reason == ERROR:
                yield sse(self.row_error(row).body())
            else:
                if ev.text:
                    yield chunk(row, ev.text, [], None)
                yield chunk(row, "", [], self.finish_reason(row))
        head = {"id": rid, "object": "text_completion", "created": now, "model": body.model}
        for line in self.stream_end(rows, head, usage_chunks):
            yield line
