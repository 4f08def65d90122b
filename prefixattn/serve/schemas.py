"""Request bodies of the HTTP API (pydantic), OpenAI's completions shape."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CompletionRequest(BaseModel):
    """``POST /v1/completions``. ``model`` names a task (or the base model: no prefix).

    Unknown extra fields (``n``, ``logprobs``, ``user``, ...) are ignored, as other
    OpenAI-compatible servers do; ``n`` other than 1 is refused by the route.
    """

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    prompt: str | list[str] = Field(description="one prompt or a list (one choice each)")
    max_tokens: int = Field(16, ge=1, description="new tokens at most")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings")
    seed: int | None = Field(None, ge=0, description="makes a sampled request reproducible")
    stream: bool = False


class AddTaskRequest(BaseModel):
    """``POST /admin/tasks``: load a saved tuner directory (prefix or soft prompt)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    path: str = Field(min_length=1)
