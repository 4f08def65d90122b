"""Shared by the serve tests: a uvicorn server on 127.0.0.1 in a thread, and a tiny
byte-level BPE tokenizer (multi-byte characters split across tokens, a chat template)."""

from __future__ import annotations

import socket
import threading
import time

CORPUS = [
    "the market rose on strong earnings and the team won the final match",
    "Emoji list: 😀 😃 😄 😁 😆 😅 🤣 😂 🙂 🙃 😉 😊 😇",
    "市场因强劲的收益而上涨，球队赢得了决赛。東京の天気は晴れです。",
    "Ünïcödé façade naïve café — “quotes” and ‘more’ … ∑ ∫ √ ≤ ≥",
    "Привет мир, как дела? مرحبا بالعالم שלום עולם",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer(vocab_size: int = 420, chat_template: bool = True):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained offline on :data:`CORPUS`:
    every byte is a token, and merges put parts of multi-byte characters together."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
        pad_token="<|endoftext|>", clean_up_tokenization_spaces=False,
    )  # fmt: skip
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


class Server:
    """uvicorn in a thread, on a socket bound to 127.0.0.1 port 0 (a free port)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> Server:
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert self.thread.is_alive() and time.time() - t0 < 30, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


class WatchedTokenizer:
    """A tokenizer wrapper for tests: records the thread of every method call and, for a
    prompt that contains ``gate_marker``, blocks the encode until ``release`` is set
    (``entered`` tells the test that the encode is under way).

    Attribute reads (``eos_token_id``, ``chat_template``, ...) pass through unrecorded;
    every callable attribute is wrapped.
    """

    def __init__(self, tokenizer, gate_marker: str | None = None) -> None:
        self._tok = tokenizer
        self.gate_marker = gate_marker
        self.threads: list[tuple[str, str]] = []  # (method, thread name)
        self.entered, self.release = threading.Event(), threading.Event()
        self._lock = threading.Lock()

    def _record(self, name: str, args) -> None:
        with self._lock:
            self.threads.append((name, threading.current_thread().name))
        text = args[0] if args else None
        if self.gate_marker and isinstance(text, str) and self.gate_marker in text:
            self.entered.set()
            assert self.release.wait(60), "the test never released the gated encode"

    def __call__(self, *args, **kwargs):
        self._record("__call__", args)
        return self._tok(*args, **kwargs)

    def __len__(self) -> int:
        return len(self._tok)

    def __getattr__(self, name: str):
        value = getattr(self._tok, name)
        if not callable(value):
            return value

        def call(*args, **kwargs):
            self._record(name, args)
            return value(*args, **kwargs)

        return call
