"""Tasks on demand (``prefixattn serve --task-dir DIR --max-loaded-tasks N``): a request's
``model`` resolves to ``DIR/NAME`` on first use, at most N loaded (LRU; never one with rows
in flight), loads off the step loop. A real uvicorn server on 127.0.0.1, called with httpx;
a tiny random GPT-2. Outputs are compared with a TaskBank built from the tuner objects that
wrote the artifacts (not read back through the task store)."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import threading

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

import httpx
from serve_support import Server

from prefixattn import PrefixTuning, PromptTuning, TaskBank
from prefixattn.hf.task_store import read_task
from prefixattn.serve import create_app, load_base
from prefixattn.serve.engine.request import GenRequest, SamplingParams
from prefixattn.serve.task_registry import TaskNameError, TaskRegistry
from prefixattn.testing import single_thread

PROMPT = "the market rose on strong"
N = 6
# name -> (kind, P); kinds: prefixattn prefix / soft prompt, PEFT prefix / soft prompt
SPECS = {
    "a": ("prefix", 3), "b": ("prefix", 5), "c": ("prefix", 1), "d": ("prefix", 7),
    "soft": ("prompt", 2), "peft_pre": ("peft_prefix", 4), "peft_soft": ("peft_prompt", 3),
    "pinned": ("prefix", 2),
}  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    pytest.importorskip("peft")
    with single_thread():
        model, tok, name = load_base("tiny")
        root = tmp_path_factory.mktemp("taskdir")
        tuners = {}
        for i, (task, (kind, P)) in enumerate(SPECS.items()):
            torch.manual_seed(100 + i)
            m = copy.deepcopy(model)
            if kind == "prefix":
                t = PrefixTuning(m, P, init="vocab")
                t.save(root / task)
            elif kind == "prompt":
                t = PromptTuning(m, P, init="vocab")
                t.save(root / task)
            elif kind == "peft_prefix":
                t = PrefixTuning(m, P, init="vocab", position_offset=P)
                t.to_peft(root / task)
            else:
                t = PromptTuning(m, P, init="vocab")
                t.to_peft(root / task)
            tuners[task] = t
        other = tmp_path_factory.mktemp("outside")
        PrefixTuning(copy.deepcopy(model), 2, init="vocab").save(other / "x")
        os.symlink(other / "x", root / "escape")
        (root / "broken").mkdir()
        (root / "broken" / "prefixattn_prefix.json").write_text("[]")
        # the reference: the tuner objects themselves (no file read back)
        ref = TaskBank(copy.deepcopy(model), {t: tuners[t] for t in SPECS})
        ids = tok(PROMPT, return_tensors="pt")["input_ids"]
        expected = {}
        for task in SPECS:
            out = ref.generate([task], input_ids=ids, max_new_tokens=N, do_sample=False)
            expected[task] = out[0, ids.shape[1] :].tolist()
        yield dict(model=model, tok=tok, name=name, root=root, expected=expected, tuners=tuners)


def make_app(env, max_loaded: int = 8, **kw):
    return create_app(
        copy.deepcopy(env["model"]), env["tok"], {"pinned": str(env["root"] / "pinned")},
        model_name=env["name"], task_dir=env["root"], max_loaded_tasks=max_loaded,
        max_num_seqs=4, **kw,
    )  # fmt: skip


def complete(url: str, model: str, max_tokens: int = N) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def token_ids(r: httpx.Response) -> list[int]:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_names_are_checked_and_unknown_tasks_are_404(env) -> None:
    with Server(make_app(env)) as srv:
        for bad in ("../a", "a/b", str(env["root"] / "a"), "escape", "x" * 200, ".", ".."):
            r = complete(srv.url, bad)
            assert r.status_code == 400, (bad, r.text)
            err = r.json()["error"]
            assert err["code"] == "invalid_model_name" and err["param"] == "model", bad
        r = complete(srv.url, "")  # refused by the request schema, as without a folder
        assert r.status_code == 422 and r.json()["error"]["param"] == "model", r.text
        for unknown in ("nope", "broken"):
            r = complete(srv.url, unknown)
            assert r.status_code == 404, (unknown, r.text)
            assert r.json()["error"]["code"] == "model_not_found"
        assert httpx.get(srv.url + "/v1/models/nope", timeout=10).status_code == 404
        assert httpx.get(srv.url + "/v1/models/..%2Fa", timeout=10).status_code in (400, 404)
        stats = srv.server.config.app.state.tasks.stats()
        assert stats["loads"] == 0 and stats["load_failures"] == 2
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200


def test_every_format_resolves_with_the_outputs_of_the_tuner(env) -> None:
    with Server(make_app(env)) as srv:
        for task in ("a", "soft", "peft_pre", "peft_soft", "pinned", "b"):
            assert token_ids(complete(srv.url, task)) == env["expected"][task], task
        reg = srv.server.config.app.state.tasks
        assert sorted(reg.loaded) == ["a", "b", "peft_pre", "peft_soft", "soft"]
        assert reg.stats()["loads"] == 5  # "pinned" was loaded at start-up


def test_concurrent_first_requests_load_once(env) -> None:
    app = make_app(env)
    with Server(app) as srv:

        async def many() -> list[httpx.Response]:
            body = {"model": "d", "prompt": PROMPT, "max_tokens": N, "temperature": 0}
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(
                    *[c.post(srv.url + "/v1/completions", json=body) for _ in range(6)]
                )

        for r in asyncio.run(many()):
            assert token_ids(r) == env["expected"]["d"]
        assert app.state.tasks.stats()["loads"] == 1


def test_lru_eviction_order_and_the_model_list(env) -> None:
    app = make_app(env, max_loaded=2)
    reg = app.state.tasks
    with Server(app) as srv:
        for task, loaded in [
            ("a", ["a"]), ("b", ["a", "b"]), ("c", ["b", "c"]),  # a evicted
            ("b", ["c", "b"]),  # b used: c is now the least recent
            ("a", ["b", "a"]),  # c evicted
            ("c", ["a", "c"]),  # b evicted
        ]:  # fmt: skip
            assert token_ids(complete(srv.url, task)) == env["expected"][task], task
            assert reg.loaded == loaded, task
            assert "pinned" in app.state.bank  # pinned: never evicted
        s = reg.stats()
        assert (s["loads"], s["evictions"], s["loaded"]) == (5, 3, 2)
        data = httpx.get(srv.url + "/v1/models", timeout=10).json()["data"]
        cards = {m["id"]: m for m in data}
        assert cards["a"]["loaded"] and cards["c"]["loaded"] and not cards["b"]["loaded"]
        assert cards["pinned"]["pinned"] and not cards["a"]["pinned"]
        assert cards["b"]["prefix_length"] is None and cards["a"]["prefix_length"] == 3
        assert {"soft", "peft_pre", "peft_soft", "d"} <= set(cards)  # the folder's tasks
        assert "broken" in cards and "escape" not in cards  # listed; loading it: 404
        one = httpx.get(srv.url + "/v1/models/d", timeout=10).json()
        assert one["id"] == "d" and one["loaded"] is False
        m = httpx.get(srv.url + "/metrics.json", timeout=10).json()["task_store"]
        assert m["evictions"] == 3 and m["insert_s"]["count"] == 5
        prom = httpx.get(srv.url + "/metrics", timeout=10).text
        assert "prefixattn:tasks_loaded 2.0" in prom
        assert "prefixattn:task_evictions_total 3.0" in prom


class _GatedSink:
    """Blocks the engine thread at its first token until ``go`` is set (the row stays
    running meanwhile); then takes every token."""

    def __init__(self) -> None:
        self.go, self.started, self.done = threading.Event(), threading.Event(), threading.Event()
        self.reason = None

    def prompt_logprobs(self, outs) -> None:
        pass

    def token(self, out) -> bool:
        self.started.set()
        assert self.go.wait(60), "test gate never opened"
        return False

    def finish(self, reason, error=None) -> None:
        self.reason = reason
        self.done.set()


def test_a_task_with_a_running_row_is_never_evicted(env) -> None:
    app = make_app(env, max_loaded=2)
    reg, engine = app.state.tasks, app.state.engine

    def load(task: str) -> None:
        fut = reg.acquire(task)
        try:
            if fut is not None:
                fut.result(60)
        finally:
            reg.release(task)

    with Server(app):
        load("a")
        load("b")
        sink = _GatedSink()
        ids = env["tok"](PROMPT)["input_ids"]
        req = GenRequest(task="a", prompt_ids=ids, params=SamplingParams(max_tokens=3), sink=sink)
        engine.submit(req)
        assert sink.started.wait(60)
        assert engine.tasks_in_use() == {"a"}
        load("c")  # a is least recently used but running: b goes
        assert reg.loaded == ["a", "c"]
        load("d")  # c goes
        assert reg.loaded == ["a", "d"]
        assert reg.acquire("d") is None  # d leased (a request between resolve and submit)
        waiting = threading.Thread(target=load, args=("b",))
        waiting.start()  # both loaded tasks in use: b's load waits for one to be free
        while reg.stats()["room_waits"] == 0:
            assert waiting.is_alive()
            waiting.join(0.01)
        assert reg.loaded == ["a", "d"] and "b" not in app.state.bank
        sink.go.set()  # a's row finishes: a is free, d is still leased
        assert sink.done.wait(60) and sink.reason == "length"
        waiting.join(60)
        assert reg.loaded == ["d", "b"]
        reg.release("d")
        assert engine.tasks_in_use() == set()


def test_loading_runs_off_the_step_loop(env, monkeypatch) -> None:
    import prefixattn.serve.task_registry as tr

    gate, entered = threading.Event(), threading.Event()

    def slow_read(path):
        if path.name == "b":
            entered.set()
            assert gate.wait(60), "test gate never opened"
        return read_task(path)

    monkeypatch.setattr(tr, "read_task", slow_read)
    app = make_app(env)
    with Server(app) as srv:
        assert token_ids(complete(srv.url, "a")) == env["expected"]["a"]
        slow: dict = {}
        t = threading.Thread(target=lambda: slow.setdefault("r", complete(srv.url, "b")))
        t.start()
        assert entered.wait(60)
        # b's load is stuck in the loader thread: a's rows still run, the loop answers
        for _ in range(2):
            assert token_ids(complete(srv.url, "a")) == env["expected"]["a"]
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        assert "r" not in slow
        gate.set()
        t.join(60)
        assert token_ids(slow["r"]) == env["expected"]["b"]


def test_registry_arguments(env, tmp_path) -> None:
    bank = TaskBank(copy.deepcopy(env["model"]))
    with pytest.raises(ValueError, match="max_loaded_tasks"):
        TaskRegistry(bank, None, env["root"], max_loaded=0)
    with pytest.raises(ValueError, match="task_dir"):
        TaskRegistry(bank, None, tmp_path / "missing")
    reg = TaskRegistry(bank, None, env["root"])
    for bad in ("", "a/b", "../a", "/a", ".x", "escape", "y" * 129):
        with pytest.raises(TaskNameError):
            reg.path_of(bad)
    assert reg.path_of("a") == env["root"].resolve() / "a"
    assert set(reg.available()) == set(SPECS) | {"broken"}  # escape leads outside
    assert json.loads((env["root"] / "broken" / "prefixattn_prefix.json").read_text()) == []


def test_cli_options(tmp_path, capsys) -> None:
    from prefixattn.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--task-dir", "d", "--max-loaded-tasks", "3"])
    assert (args.task_dir, args.max_loaded_tasks) == ("d", 3)
    assert build_parser().parse_args(["serve"]).max_loaded_tasks == 64
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-loaded-tasks", "0"])
    assert main(["serve", "--model", "tiny", "--task-dir", str(tmp_path / "missing")]) == 2
    assert "--task-dir" in capsys.readouterr().err


def test_task_store_reads_every_format(env) -> None:
    from prefixattn.hf.prefix_tuning import ModelGeometry

    g = ModelGeometry.of(env["model"])
    for task, (kind, P) in SPECS.items():
        art = read_task(env["root"] / task)
        assert art.num_virtual_tokens == P, task
        assert (art.method, art.source) == {
            "prefix": ("prefix", "prefixattn"), "prompt": ("prompt", "prefixattn"),
            "peft_prefix": ("prefix", "peft"), "peft_prompt": ("prompt", "peft"),
        }[kind]  # fmt: skip
        t = env["tuners"][task]
        if art.method == "prefix":
            kv = art.prefix_kv(g.num_layers, g.num_kv_heads, g.head_dim)
            torch.testing.assert_close(kv, t.prefix_tensor().detach().float(), rtol=0, atol=0)
            assert art.position_offset == (P if kind == "peft_prefix" else 0)
        else:
            torch.testing.assert_close(art.tensor, t.prompt.detach().float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit"):
        read_task(env["root"] / "peft_pre").prefix_kv(g.num_layers + 1, g.num_kv_heads, g.head_dim)
    with pytest.raises(ValueError, match="soft prompt"):
        read_task(env["root"] / "soft").prefix_kv(g.num_layers, g.num_kv_heads, g.head_dim)
    with pytest.raises(ValueError):
        read_task(env["root"] / "broken")
