"""Request bodies of the HTTP API (pydantic): OpenAI's completions and chat shapes, and
vLLM's ``/tokenize`` / ``/detokenize``.

Fields that OpenAI or vLLM define and that would change the output but are not
implemented here (``logit_bias``, penalties, ``suffix``, ``best_of`` > ``n``, ...) are
refused with a 400 naming the field (:func:`refused_fields`), never ignored; so is any
other unknown field, except the few that cannot change the output (:data:`HARMLESS`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

MAX_SEED = 2**64 - 1  # torch generators take seeds in [0, 2^64)
MAX_LOGPROBS = 20  # top alternatives per token (vLLM's default max_logprobs)
MAX_N = 16

# extra fields accepted and ignored: they cannot change the output
HARMLESS = frozenset({"user", "metadata", "store", "service_tier", "request_id"})
# extra fields accepted when they hold their no-op value
NO_OP = {
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "suffix": (None, ""),
    "top_k": (None, -1, 0),
    "min_p": (None, 0, 0.0),
    "min_tokens": (None, 0),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1, 1.0),
    "prompt_logprobs": (None,),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, False, True),
    "functions": (None, []),
    "function_call": (None, "none"),
}


def _no_surrogates(text: str) -> str:
    """Refuse lone UTF-16 surrogates (JSON's ``"\\ud800"``): they are not text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"invalid Unicode at character {err.start}: a lone surrogate "
            f"({text[err.start]!r}); send UTF-8 text"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_no_surrogates)]
TokenIds = list[Annotated[int, Field(ge=0)]]


def refused_fields(body: BaseModel) -> tuple[str, str] | None:
    """(field, why) of the first extra field that would change the output, or None."""
    for name, value in (body.model_extra or {}).items():
        if name in HARMLESS:
            continue
        if name in NO_OP:
            if name == "best_of" and value == getattr(body, "n", 1):
                continue
            if value in NO_OP[name]:
                continue
            return name, f"{name}={value!r} is not supported by this server"
        return name, f"unknown field {name!r} (this server does not implement it)"
    return None


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields common to completions and chat."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt")
    stop: Text | list[Text] | None = Field(None, description="stop strings (any number)")
    stop_token_ids: TokenIds | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="reproducible sampling")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    """``POST /v1/completions``. ``model`` names a task (or the base model: no prefix).

    ``prompt``: a string, a list of strings, a list of token ids or a list of such lists
    (one choice each, ``n`` choices per prompt). ``logprobs = k`` reports each token's
    logprob and the top ``k``; ``echo`` prepends the prompt (with its logprobs when
    ``logprobs`` is set); ``max_tokens = 0`` is allowed with ``echo`` (scoring only).
    """

    prompt: Text | list[Text] | TokenIds | list[TokenIds] = Field(
        description="text, texts, token ids or lists of token ids"
    )
    max_tokens: int = Field(16, ge=0, description="new tokens at most")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @model_validator(mode="after")
    def _max_tokens_zero_needs_echo(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be >= 1 unless echo is true")
        return self


class TextPart(BaseModel):
    """A text part of a message's content (images and audio are not supported)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    """One message: ``role`` and ``content`` (a string or a list of text parts)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def as_template_input(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        msg: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name is not None:
            msg["name"] = self.name
        return msg


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: the messages through the tokenizer's chat template.

    ``max_tokens`` (or ``max_completion_tokens``) defaults to the rest of the context.
    ``logprobs`` (bool) with ``top_logprobs = k`` reports each token's logprob and the
    top ``k``.
    """

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class TokenizeRequest(BaseModel):
    """``POST /tokenize`` (vLLM's shape): a ``prompt``, or chat ``messages``."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class DetokenizeRequest(BaseModel):
    """``POST /detokenize`` (vLLM's shape)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: TokenIds


class AddTaskRequest(BaseModel):
    """``POST /admin/tasks``: load a saved tuner directory (prefix or soft prompt).

    ``name``: letters, digits, ``.``, ``_``, ``-`` and ``:`` (a name must fit in a URL path
    segment, so that ``DELETE /admin/tasks/{name}`` can remove it).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
    path: Text = Field(min_length=1)
