"""Bearer tokens: an API key for the inference routes, the admin token for ``/admin``.

Checked by an ASGI middleware before routing and before the body is read, so an
unauthenticated caller learns nothing about a route's schema. The comparison is
constant-time over bytes and never raises, whatever bytes the header holds.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError

# the inference routes (vLLM's: everything under /v1, and tokenize / detokenize), and
# /metrics.json, which names every task as /v1/models does. /health stays open, and so
# does Prometheus' /metrics (as vLLM's; its labels name the tasks that served requests)
INFERENCE_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/metrics.json")


def token_matches(header: bytes | None, token: str) -> bool:
    """Whether ``header`` is ``Bearer <token>`` (constant time; any bytes; never raises)."""
    want = b"Bearer " + token.encode("utf-8")
    return hmac.compare_digest(header or b"", want)


class BearerAuth:
    """ASGI middleware: 401 in OpenAI's shape unless the route's token is presented.

    Arguments:
        app: the wrapped app.
        api_key: needed on the inference routes (None: they are open).
        admin_token: needed on ``/admin`` (None: no admin routes; they answer 404).
    """

    def __init__(self, app: ASGIApp, api_key: str | None, admin_token: str | None) -> None:
        self.app, self.api_key, self.admin_token = app, api_key, admin_token

    def _required(self, path: str) -> tuple[str, str] | None:
        if self.admin_token and (path == "/admin" or path.startswith("/admin/")):
            return self.admin_token, "admin routes need 'Authorization: Bearer <admin token>'"
        if self.api_key and (path == "/v1" or path.startswith(INFERENCE_PREFIXES)):
            return self.api_key, "this server needs 'Authorization: Bearer <API key>'"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            need = self._required(scope.get("path", ""))
            if need is not None:
                header = None
                for key, value in scope.get("headers") or []:
                    if key == b"authorization":
                        header = value
                        break
                if not token_matches(header, need[0]):
                    err = APIError(
                        401, need[1], "invalid_api_key", kind="authentication_error",
                        headers={"WWW-Authenticate": "Bearer"},
                    )  # fmt: skip
                    await err.response()(scope, receive, send)
                    return
        await self.app(scope, receive, send)
