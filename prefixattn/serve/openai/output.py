"""From the engine's tokens to what a client reads: text, stop strings and logprobs.

:class:`RequestOutput` implements :class:`~prefixattn.serve.engine.request.OutputSink` for
one row; its work runs on the tokenizer's thread (never the engine's, never the event
loop). Its text is built incrementally and only ever appended to: a piece is released once
it can no longer change (:class:`IncrementalDetokenizer` holds back a decode that ends
inside a character; :class:`StopStrings` holds back what a stop string could still
swallow), so the concatenated stream is the unstreamed text, byte for byte. The
non-streamed response is assembled from the very same events.

Logprobs leave the engine as token ids and floats and are formatted here, in OpenAI's
completions shape (:func:`completion_logprobs`) or chat shape (:func:`chat_logprobs`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..engine.request import ERROR, STOP, TokenOut

# what JSON carries for a log-probability of -inf (or NaN): vLLM's convention
LOGPROB_FLOOR = -9999.0


class IncrementalDetokenizer:
    """Turns token ids into text one token at a time, never a broken character.

    Each step decodes a small window (the last released tokens plus the new ones, as
    vLLM's ``detokenize_incrementally``) and releases the new text only when the decode
    does not end in U+FFFD (the bytes so far end inside a UTF-8 character) and extends
    the window's previous text; otherwise the tokens wait for the next step or
    :meth:`flush`. Released pieces are never revised.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start: the previously released chunk's first token
        self.read = 0  # tokens up to here are released

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def step(self, token_id: int) -> str:
        """Add one token; return the text that became final (often "")."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd") or not now.startswith(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before) :]

    def flush(self) -> str:
        """The rest of the text (the row ended): what was held back, as it decodes."""
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return now[len(before) :] if len(now) > len(before) else ""


class StopStrings:
    """Finds the first stop string in a growing text; releases only what none can swallow.

    Any number of stop strings. ``include`` keeps the matched stop string in the text
    (vLLM's ``include_stop_str_in_output``).
    """

    def __init__(self, stops: Sequence[str], include: bool = False) -> None:
        self.stops, self.include = tuple(stops), include
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0  # characters of text released
        self.stopped = False

    def add(self, delta: str) -> tuple[str, bool]:
        """Append ``delta``; return (the text now final, whether a stop string matched)."""
        if self.stopped or not delta:
            return "", self.stopped
        start = max(len(self.text) - self.hold, 0)  # a new match must end in delta
        self.text += delta
        best: tuple[int, int] | None = None
        for s in self.stops:
            pos = self.text.find(s, start)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, len(s))
        if best is not None:
            self.stopped = True
            end = best[0] + (best[1] if self.include else 0)
            return self._release(end), True
        return self._release(len(self.text) - self.hold), False

    def flush(self) -> str:
        """Everything not yet released (the row ended without a stop string)."""
        return "" if self.stopped else self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : upto], upto
        return piece


@dataclass
class LogprobEntry:
    """One token's log-probability and its top alternatives, token strings decoded."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Event:
    """What a row tells the HTTP layer: ``kind`` is "prompt", "delta" or "finish"."""

    kind: str
    text: str = ""
    logprobs: list[LogprobEntry | None] | None = None
    token_ids: list[int] = field(default_factory=list)
    reason: str | None = None
    error: str | None = None


def _finite(x: float | None) -> float:
    return LOGPROB_FLOOR if x is None or not math.isfinite(x) else max(float(x), LOGPROB_FLOOR)


class TokenStrings:
    """Decodes single token ids for logprob reports (cached; special tokens shown)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._cache) < 200_000:
                self._cache[token_id] = text
        return text

    def entry(self, out: TokenOut) -> LogprobEntry:
        top = [(self(t), _finite(lp)) for t, lp in (out.top or [])]
        return LogprobEntry(out.token_id, self(out.token_id), _finite(out.logprob), top)


class RequestOutput:
    """The :class:`OutputSink` of one row: detokenizes, applies stop strings, reports.

    The engine calls :meth:`prompt_logprobs`, :meth:`token` and :meth:`finish` from its
    worker thread; they never touch the tokenizer: each hands its work to ``run`` (the
    tokenizer's thread, which runs jobs one at a time and in order), where the text is
    decoded, the stop strings are matched and each result becomes one :class:`Event`
    handed to ``emit`` (which must be thread-safe: the app forwards it to the event loop).

    A stop string is therefore found a step or two after its token (as vLLM's
    detokenizer, which runs apart from the engine core): :meth:`token` ends the row at
    the engine's next token once the tokenizer's thread saw the match, and the tokens in
    between are dropped here, so the text is still cut exactly at the stop string and
    the reported tokens end with the one that completed it. EOS ids (``eos_ids``) need no
    tokenizer and end the row at once.

    Arguments:
        tokenizer: decodes the row's tokens.
        token_strings: shared decoder of single tokens (logprob reports).
        emit: receives each event.
        stop: stop strings (any number); ``include_stop`` keeps the match in the text.
        logprobs: report each generated token's logprob (and ``top``) when True.
        skip_special_tokens: as ``tokenizer.decode``.
        eos_ids: end-of-sequence ids this sink ends the row on itself (the engine then
            runs with ``ignore_eos``), so that the EOS token is reported with its logprob
            as vLLM does (lm-eval's loglikelihood reads the entry after the prompt); it
            adds no text.
        run: queues a job on the tokenizer's thread; None: run it at once, in the
            caller's thread (a sink used without a server).
    """

    def __init__(
        self,
        tokenizer: Any,
        token_strings: TokenStrings,
        emit: Callable[[Event], None],
        *,
        stop: Sequence[str] = (),
        include_stop: bool = False,
        logprobs: bool = False,
        skip_special_tokens: bool = True,
        eos_ids: frozenset[int] = frozenset(),
        run: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stops = StopStrings(stop, include_stop)
        self.strings, self.emit, self.logprobs = token_strings, emit, logprobs
        self.eos_ids = eos_ids
        self.run = run
        # written by the tokenizer's thread, read by the engine's (a bool or str swap)
        self.num_tokens = 0  # tokens reported
        self.stop_seen = False  # a stop string matched
        self.failed: str | None = None  # the output failed (the row ends with ERROR)
        # the engine's thread
        self.t_first_token: float | None = None
        self.finished = False

    # ------------------------------------------------------------ engine's thread

    def prompt_logprobs(self, outs: list[TokenOut | None]) -> None:
        """The prompt's tokens with their logprobs (the first None)."""
        self._submit(self._prompt, list(outs))

    def token(self, out: TokenOut) -> bool:
        """One generated token; True ends the row now (an EOS of ``eos_ids``, or a stop
        string the tokenizer's thread matched in an earlier token)."""
        if self.t_first_token is None:
            self.t_first_token = time.perf_counter()
        eos = out.token_id in self.eos_ids
        self._submit(self._token, out, eos)
        return eos or self.stop_seen or self.failed is not None

    def finish(self, reason: str, error: str | None = None) -> None:
        """The row ended: the held-back text, then the finish event (once)."""
        if self.finished:
            return
        self.finished = True
        self._submit(self._finish, reason, error)

    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        def job() -> None:
            try:
                fn(*args)
            except Exception as err:  # a tokenizer failure ends the row, not the server
                if self.failed is None:
                    self.failed = f"output failed: {type(err).__name__}: {err}"
                if fn == self._finish:  # the finish event must still reach the client
                    self.emit(Event("finish", reason=ERROR, error=self.failed))

        if self.run is None:
            job()
            return
        with contextlib.suppress(RuntimeError):  # the tokenizer's thread is shut down
            self.run(job)

    # ------------------------------------------------------------ tokenizer's thread

    def _prompt(self, outs: list[TokenOut | None]) -> None:
        entries = [None if o is None else self.strings.entry(o) for o in outs]
        self.emit(Event("prompt", logprobs=entries))

    def _token(self, out: TokenOut, eos: bool) -> None:
        if self.stops.stopped or self.failed is not None:
            return  # generated after the stop string matched: not part of the output
        self.num_tokens += 1
        if eos:
            text = ""
        else:
            text, self.stop_seen = self.stops.add(self.detok.step(out.token_id))
        entries = [self.strings.entry(out)] if self.logprobs else None
        self.emit(Event("delta", text=text, logprobs=entries, token_ids=[out.token_id]))

    def _finish(self, reason: str, error: str | None) -> None:
        text = ""
        if self.failed is not None:
            reason, error = ERROR, self.failed
        elif reason != ERROR and not self.stops.stopped:
            # a stop string may still match in the held-back tail (flush() is then "")
            text = self.stops.add(self.detok.flush())[0] + self.stops.flush()
        if self.stops.stopped and reason != ERROR:
            reason = STOP
        self.emit(Event("finish", text=text, reason=reason, error=error))


def completion_logprobs(entries: Sequence[LogprobEntry | None], offset: int = 0) -> dict:
    """OpenAI's completions ``logprobs`` object for ``entries`` (None: the first prompt
    token, which nothing predicts). ``top_logprobs`` holds the top alternatives and the
    chosen token (as vLLM); ``text_offset`` counts characters from ``offset``."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for e in entries:
        text_offset.append(offset)
        if e is None:  # only the first prompt token: its text is still part of the echo
            tokens.append("")
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        tokens.append(e.token)
        token_logprobs.append(e.logprob)
        top: dict[str, float] = {}
        for t, lp in e.top:  # descending: where token strings collide, the likelier wins
            top.setdefault(t, lp)
        top.setdefault(e.token, e.logprob)
        top_logprobs.append(top)
        offset += len(e.token)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(entries: Sequence[LogprobEntry | None]) -> dict:
    """OpenAI's chat ``logprobs`` object (``{"content": [...]}``) for generated tokens."""
    return {
        "content": [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": _bytes(e.token),
                "top_logprobs": [
                    {"token": t, "logprob": lp, "bytes": _bytes(t)} for t, lp in e.top
                ],
            }
            for e in entries
            if e is not None
        ]
    }
