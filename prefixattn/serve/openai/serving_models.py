"""``GET /v1/models``, ``GET /v1/models/{id}`` (with the context length), and vLLM's
``POST /tokenize`` / ``POST /detokenize``."""

from __future__ import annotations

from typing import Any

from .errors import APIError
from .protocol import DetokenizeRequest, TokenizeRequest
from .serving import OpenAIServing
from .serving_chat import chat_prompt_ids


class OpenAIServingModels(OpenAIServing):
    """The model cards and the tokenizer routes."""

    def card(self, name: str) -> dict[str, Any]:
        """One model card; ``max_model_len`` (vLLM's name) is the context a request of
        this task may fill (prompt + generated), its position offset deducted. With a
        task folder: ``loaded`` (in memory now) and ``pinned`` (never evicted); a task of
        the folder not loaded yet has no ``max_model_len`` / prefix fields (None) until
        its first request loads it."""
        bank, reg = self.ctx.bank, self.ctx.tasks
        if name not in bank:  # a task of the folder, not loaded
            return {
                "id": name, "object": "model", "created": self.ctx.created,
                "owned_by": "prefixattn", "root": self.ctx.model_name,
                "parent": self.ctx.model_name, "base": False, "max_model_len": None,
                "prefix_length": None, "position_offset": None, "loaded": False,
                "pinned": False,
            }  # fmt: skip
        extra = {} if reg is None else {"loaded": True, "pinned": reg.is_pinned(name)}
        return {
            "id": name,
            "object": "model",
            "created": self.ctx.created,
            "owned_by": "prefixattn",
            "root": self.ctx.model_name,
            "parent": None if name == self.ctx.model_name else self.ctx.model_name,
            "base": name == self.ctx.model_name,
            "max_model_len": self.ctx.max_len(name),
            "prefix_length": bank.lengths.get(name),
            "position_offset": bank.offsets.get(name),
            **extra,
        }

    def list(self) -> dict[str, Any]:
        """The bank's tasks (loaded), then the task folder's tasks not loaded (like vLLM
        listing its LoRA modules)."""
        names = self.ctx.bank.tasks
        if self.ctx.tasks is not None:
            have = set(names)
            names = names + [n for n in self.ctx.tasks.available() if n not in have]
        return {"object": "list", "data": [self.card(n) for n in names]}

    def retrieve(self, model_id: str) -> dict[str, Any]:
        reg = self.ctx.tasks
        if reg is not None and model_id not in self.ctx.bank:
            try:
                if reg.in_folder(model_id):
                    return self.card(model_id)
            except ValueError as err:
                raise APIError(400, str(err), "invalid_model_name", "model") from None
        return self.card(self.check_model(model_id))

    async def _model(self, name: str | None) -> str:
        if name is None:
            return self.ctx.model_name
        task = await self.acquire_model(name)  # a task of the folder: loaded now
        self.release_model(task)
        return task

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        task, tok = await self._model(body.model), self.ctx.tokenizer
        if body.messages is not None:
            ids = await self.off_loop(
                chat_prompt_ids, self.ctx, body.messages, body.add_generation_prompt
            )
        else:
            encode = lambda: list(  # noqa: E731
                tok(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
            )
            ids = await self.off_loop(encode)
        strs = None
        if body.return_token_strs:  # the tokenizer's thread, as every tokenizer call
            strs = await self.off_loop(tok.convert_ids_to_tokens, ids)
        return {
            "count": len(ids), "max_model_len": self.ctx.max_len(task), "tokens": ids,
            "token_strs": strs,
        }  # fmt: skip

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        await self._model(body.model)
        self.check_token_ids(body.tokens, "tokens")
        try:
            text = await self.off_loop(self.ctx.tokenizer.decode, body.tokens)
        except Exception as err:  # e.g. an id the tokenizer's vocabulary lacks
            raise APIError(400, f"cannot decode tokens: {err}", "invalid_token_id",
                           "tokens") from None  # fmt: skip
        return {"prompt": text}
