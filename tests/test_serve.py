"""``prefixattn serve`` on loopback: a real uvicorn server on 127.0.0.1 (tiny random GPT-2,
tiny saved task artifacts of different P, a soft prompt among them), called with httpx
(and the openai client when installed). Greedy outputs equal ``TaskBank.generate`` of the
row alone; mixed-task requests share batches; streaming; every bad input; a bounded load
test."""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

import httpx
from serve_support import Server

from prefixattn import PrefixTuning, PromptTuning, TaskBank
from prefixattn.serve import (
    Engine,
    GenRequest,
    QueueFullError,
    SamplingParams,
    create_app,
    load_base,
)
from prefixattn.serve.openai.output import RequestOutput, TokenStrings
from prefixattn.testing import single_thread

TOKEN = "s3cret"
PROMPTS = [
    "Article: the market rose on strong earnings\nTopic:",
    "Article: the team won the final match\nTopic:",
    "the minister said",
    "Topic:",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with single_thread():
        model, tok, name = load_base("tiny")
        root = tmp_path_factory.mktemp("tasks")
        specs = {"bbc": 3, "sst2": 6, "extra": 5}
        for i, (task, P) in enumerate(specs.items()):
            torch.manual_seed(10 + i)
            PrefixTuning(copy.deepcopy(model), P, init="vocab").save(root / task)
        torch.manual_seed(20)
        PromptTuning(copy.deepcopy(model), 2, init="vocab").save(root / "soft")
        tasks = {t: str(root / t) for t in ("bbc", "sst2", "soft")}
        app = create_app(
            copy.deepcopy(model), tok, tasks, model_name=name, admin_token=TOKEN,
            max_num_seqs=8, max_queue=64,
        )  # fmt: skip
        ref = TaskBank(copy.deepcopy(model), {**tasks, "extra": str(root / "extra")})
        ref.add_base(name)
        cache: dict = {}

        def expected(task: str, prompt: str, n: int) -> list[int]:
            """TaskBank.generate for the row alone (greedy), cut at EOS."""
            if (task, prompt, n) not in cache:
                ids = tok(prompt, return_tensors="pt")["input_ids"]
                out = ref.generate([task], input_ids=ids, max_new_tokens=n, do_sample=False)
                new = out[0, ids.shape[1] :].tolist()
                eos = tok.eos_token_id
                cache[(task, prompt, n)] = new[: new.index(eos)] if eos in new else new
            return cache[(task, prompt, n)]

        with Server(app) as srv:
            yield dict(url=srv.url, app=app, tok=tok, root=root, expected=expected, name=name)


def post(env, body, timeout: float = 30.0):
    return httpx.post(env["url"] + "/v1/completions", json=body, timeout=timeout)


def test_models_health_and_greedy_equals_taskbank_alone(env) -> None:
    models = httpx.get(env["url"] + "/v1/models", timeout=10).json()
    info = {m["id"]: m for m in models["data"]}
    assert set(info) == {"tiny", "bbc", "sst2", "soft"}
    assert info["sst2"]["prefix_length"] == 6 and info["tiny"]["prefix_length"] == 0
    assert info["soft"]["position_offset"] == 2 and info["tiny"]["base"]
    assert httpx.get(env["url"] + "/health", timeout=10).json()["status"] == "ok"
    outs = set()
    for task in ("bbc", "sst2", "soft", "tiny"):
        r = post(env, {"model": task, "prompt": PROMPTS[:2], "max_tokens": 7, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["model"] == task
        for i, choice in enumerate(body["choices"]):
            want = env["expected"](task, PROMPTS[i], 7)
            assert choice["token_ids"] == want, (task, i)
            assert choice["text"] == env["tok"].decode(want, skip_special_tokens=True)
            assert choice["finish_reason"] == ("length" if len(want) == 7 else "stop")
            outs.add(tuple(want))
        assert body["usage"]["completion_tokens"] == sum(
            len(c["token_ids"]) for c in body["choices"]
        )
    assert len(outs) > 2  # the tasks really differ


def _concurrent(env, bodies: list[dict], limit: int, timeout: float = 60.0) -> list:
    async def run() -> list:
        sem = asyncio.Semaphore(limit)
        async with httpx.AsyncClient(base_url=env["url"], timeout=timeout) as client:

            async def one(body):
                async with sem:
                    return await client.post("/v1/completions", json=body)

            return await asyncio.wait_for(
                asyncio.gather(*(one(b) for b in bodies)), timeout=timeout
            )

    return asyncio.run(run())


def _gated(env, bodies: list[dict], limit: int, timeout: float = 120.0) -> tuple[list, dict]:
    """Send ``bodies`` (``limit`` at a time) while the engine is held on its first step
    until the rest of the first ``limit`` requests wait in its queue: the queue fills
    before any step runs, whatever the machine's speed. Returns the responses and
    /metrics.json from before."""
    engine = env["app"].state.engine
    before = httpx.get(env["url"] + "/metrics.json", timeout=10).json()
    out: dict = {}
    engine.model_lock.acquire()  # the worker blocks in its next step
    try:
        batches = engine.batches
        th = threading.Thread(
            target=lambda: out.setdefault("r", _concurrent(env, bodies, limit, timeout))
        )
        th.start()
        _wait(lambda: engine.batches > batches)  # the first step is held
        # every request of the first wave is in the engine: in the held step, or queued
        _wait(lambda: engine.running + engine.queue_depth == min(limit, len(bodies)))
    finally:
        engine.model_lock.release()
    th.join(timeout)
    assert "r" in out, "the requests did not finish"
    return out["r"], before


def _grew(before: dict, after: dict, rows: int) -> int:
    """Steps of ``rows`` rows run between two /metrics.json snapshots."""
    return after["batch_sizes"].get(str(rows), 0) - before["batch_sizes"].get(str(rows), 0)


def test_concurrent_mixed_tasks_share_batches(env) -> None:
    tasks = ["bbc", "sst2", "soft", "tiny"]
    bodies = [
        {"model": tasks[i % 4], "prompt": PROMPTS[i % 3], "max_tokens": 3 + i % 4,
         "temperature": 0}
        for i in range(12)
    ]  # fmt: skip
    responses, before = _gated(env, bodies, limit=12)
    for body, r in zip(bodies, responses):
        assert r.status_code == 200, r.text
        got = r.json()["choices"][0]["token_ids"]
        assert got == env["expected"](body["model"], body["prompt"], body["max_tokens"])
    after = httpx.get(env["url"] + "/metrics.json", timeout=10).json()
    assert after["mixed_task_batches"] > before["mixed_task_batches"]
    assert after["max_tasks_in_batch"] >= 2
    # with all 12 requests in, a step after the held one runs max_num_seqs = 8 rows
    assert _grew(before, after, 8) >= 1, after["batch_sizes"]
    assert after["latency_s"]["p50"] is not None and after["queue_depth"] == 0


def _sse(env, body) -> list:
    events = []
    with httpx.stream("POST", env["url"] + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    return events


def test_streaming_and_stop_strings(env) -> None:
    body = {"model": "sst2", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0}
    full = post(env, body).json()["choices"][0]
    events = _sse(env, {**body, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == full["text"]
    assert chunks[-1]["finish_reason"] == full["finish_reason"]
    assert sum(c["text"] != "" for c in chunks) > 1  # really streamed, token by token
    # a stop string cuts the text before it, streamed or not
    words = full["text"].split()
    assert len(words) >= 3
    stop = words[2]
    cut = full["text"][: full["text"].find(stop)]
    got = post(env, {**body, "stop": [stop, "zzz"]}).json()["choices"][0]
    assert got["text"] == cut and got["finish_reason"] == "stop"
    events = _sse(env, {**body, "stop": stop, "stream": True})
    streamed = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in streamed) == cut


@pytest.mark.parametrize(
    "body,status,match",
    [
        ({"model": "nope", "prompt": "x", "max_tokens": 2}, 404, "not served"),
        ({"model": "bbc", "max_tokens": 2}, 422, "prompt"),
        ({"model": "bbc", "prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
        ({"model": "bbc", "prompt": "x", "temperature": -1}, 422, "temperature"),
        ({"model": "bbc", "prompt": "x", "top_p": 0}, 422, "top_p"),
        ({"model": "bbc", "prompt": 5}, 422, "prompt"),
        ({"model": "bbc", "prompt": "x", "max_tokens": 600}, 400, "context"),
        ({"model": "bbc", "prompt": "x", "n": 17}, 422, "n"),
        ({"model": "bbc", "prompt": "x", "stop": ["a", ""]}, 400, "stop"),
        ({"model": "bbc", "prompt": []}, 400, "prompt"),
        ({"model": "bbc", "prompt": ""}, 400, "empty"),
    ],
)
def test_bad_requests_get_4xx_and_server_stays_up(env, body, status, match) -> None:
    r = post(env, body)
    assert r.status_code == status, r.text
    assert match in r.json()["error"]["message"]
    assert httpx.get(env["url"] + "/health", timeout=10).status_code == 200


def test_malformed_json_and_long_prompt(env) -> None:
    r = httpx.post(
        env["url"] + "/v1/completions", content=b'{"model": "bbc", "prompt": ',
        headers={"content-type": "application/json"}, timeout=10,
    )  # fmt: skip
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    long = " ".join(["the"] * 520)
    r = post(env, {"model": "bbc", "prompt": long, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.get(env["url"] + "/health", timeout=10).status_code == 200


def _wait(cond, timeout: float = 20.0) -> None:
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "condition not reached"
        time.sleep(0.02)


def test_full_queue_429_and_disconnect_frees_the_slot(env) -> None:
    engine = env["app"].state.engine
    body = {"model": "bbc", "prompt": PROMPTS[1], "max_tokens": 3, "temperature": 0}
    results: dict = {}

    def send(key, timeout=30.0):
        try:
            results[key] = post(env, body, timeout=timeout)
        except httpx.TimeoutException:
            results[key] = "timeout"

    old_max = engine.max_queue
    engine.model_lock.acquire()  # the worker blocks on its next batch
    try:
        batches = engine.batches
        a = threading.Thread(target=send, args=("a",))
        a.start()
        _wait(lambda: engine.batches > batches)  # "a" is taken, its batch blocked
        engine.max_queue = 2
        cancelled, gone = engine.requests["cancelled"], engine.requests["client_gone"]
        b = threading.Thread(target=send, args=("b", 1.5))
        b.start()
        c = threading.Thread(target=send, args=("c",))
        c.start()
        _wait(lambda: engine.queue_depth == 2)
        r = post(env, body)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        b.join()
        assert results["b"] == "timeout"  # the client of "b" went away
        _wait(lambda: engine.requests["client_gone"] > gone)  # and the server noticed
        assert httpx.get(env["url"] + "/health", timeout=10).status_code == 200
    finally:
        engine.max_queue = old_max
        engine.model_lock.release()
    a.join(30)
    c.join(30)
    want = env["expected"]("bbc", PROMPTS[1], 3)
    for key in ("a", "c"):
        assert results[key].status_code == 200
        assert results[key].json()["choices"][0]["token_ids"] == want
    _wait(lambda: engine.requests["cancelled"] > cancelled)  # "b" freed without running
    _wait(lambda: engine.queue_depth == 0)


def test_admin_routes(env) -> None:
    url, root = env["url"], env["root"]
    new = {"name": "extra", "path": str(root / "extra")}
    assert httpx.post(url + "/admin/tasks", json=new, timeout=10).status_code == 401
    bad = {"authorization": "Bearer wrong"}
    assert httpx.post(url + "/admin/tasks", json=new, headers=bad, timeout=10).status_code == 401
    auth = {"authorization": f"Bearer {TOKEN}"}
    r = httpx.post(url + "/admin/tasks", json=new, headers=auth, timeout=30)
    assert r.status_code == 201, r.text
    assert r.json()["prefix_length"] == 5
    got = post(env, {"model": "extra", "prompt": PROMPTS[2], "max_tokens": 5, "temperature": 0})
    assert got.json()["choices"][0]["token_ids"] == env["expected"]("extra", PROMPTS[2], 5)
    missing = {"name": "x", "path": str(root / "missing")}
    r = httpx.post(url + "/admin/tasks", json=missing, headers=auth, timeout=10)
    assert r.status_code == 400 and "path" in r.json()["error"]["message"]
    r = httpx.post(url + "/admin/tasks", json={"name": "x", "path": str(root)}, headers=auth,
                   timeout=10)  # fmt: skip
    assert r.status_code == 400 and "cannot load" in r.json()["error"]["message"]
    assert httpx.delete(url + "/admin/tasks/extra", timeout=10).status_code == 401
    r = httpx.delete(url + "/admin/tasks/extra", headers=auth, timeout=10)
    assert r.status_code == 200 and "extra" not in r.json()["tasks"]
    r = post(env, {"model": "extra", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 404
    assert httpx.delete(url + "/admin/tasks/tiny", headers=auth, timeout=10).status_code == 400
    # the base model's tasks still answer
    assert post(env, {"model": "bbc", "prompt": "x", "max_tokens": 1}).status_code == 200


def test_no_token_no_admin_route_and_engine_queue_bound(env) -> None:
    model, tok, _ = load_base("tiny")
    app = create_app(model, tok, {}, model_name="tiny")

    async def call():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            r = await client.post("/admin/tasks", json={"name": "a", "path": "/"})
            return r.status_code

    assert asyncio.run(call()) in (404, 405)
    engine = Engine(app.state.bank, tok, max_queue=2)  # never started: nothing drains
    sink = RequestOutput(tok, TokenStrings(tok), lambda ev: None)

    def req() -> GenRequest:
        return GenRequest(task="tiny", prompt_ids=[5], params=SamplingParams(1), sink=sink)

    for _ in range(2):
        engine.submit(req())
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.submit(req())
    assert engine.metrics()["requests"]["rejected"] == 1


def test_load_200_requests_16_concurrent(env) -> None:
    tasks = ["bbc", "sst2", "soft", "tiny"]
    bodies = [
        {"model": tasks[i % 4], "prompt": PROMPTS[(i // 4) % 4], "max_tokens": 2 + i % 3,
         "temperature": 0}
        for i in range(200)
    ]  # fmt: skip
    responses, before = _gated(env, bodies, limit=16, timeout=300)
    assert len(responses) == 200
    for body, r in zip(bodies, responses):
        assert r.status_code == 200, r.text
        got = r.json()["choices"][0]["token_ids"]
        assert got == env["expected"](body["model"], body["prompt"], body["max_tokens"])
    after = httpx.get(env["url"] + "/metrics.json", timeout=10).json()
    done = after["requests"]["completed"] - before["requests"].get("completed", 0)
    assert done == 200 and after["queue_depth"] == 0
    # batched, not one by one: the 16 requests in at the release ran 8 at once
    assert _grew(before, after, 8) >= 1, after["batch_sizes"]


def test_openai_client(env) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=env["url"] + "/v1", api_key="unused", max_retries=0)
    got = client.completions.create(model="soft", prompt=PROMPTS[3], max_tokens=6, temperature=0)
    want = env["expected"]("soft", PROMPTS[3], 6)
    assert got.choices[0].text == env["tok"].decode(want, skip_special_tokens=True)
    stream = client.completions.create(
        model="soft", prompt=PROMPTS[3], max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == got.choices[0].text
    assert [m.id for m in client.models.list()].count("soft") == 1
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)


def test_stream_client_gone_stops_its_row(env) -> None:
    """A streaming client that leaves while its batch waits: the row is cancelled and
    generates at most one token instead of 300."""
    engine = env["app"].state.engine
    body = {"model": "sst2", "prompt": PROMPTS[0], "max_tokens": 300, "temperature": 0,
            "stream": True}  # fmt: skip
    cancelled, tokens = engine.requests["cancelled"], engine.tokens_generated
    gone = engine.requests["client_gone"]
    engine.model_lock.acquire()
    try:
        batches = engine.batches
        timeout = httpx.Timeout(10.0, read=1.0)  # the body read times out: the client leaves
        with (
            pytest.raises(httpx.ReadTimeout),
            httpx.stream("POST", env["url"] + "/v1/completions", json=body, timeout=timeout) as r,
        ):
            assert r.status_code == 200
            for _ in r.iter_lines():
                pass
        _wait(lambda: engine.batches > batches)
        _wait(lambda: engine.requests["client_gone"] > gone)  # noticed while it waits
    finally:
        engine.model_lock.release()
    _wait(lambda: engine.requests["cancelled"] > cancelled)
    _wait(lambda: engine.queue_depth == 0)
    assert engine.tokens_generated - tokens <= 1


def _raw_post(env, body: dict) -> socket.socket:
    """POST ``body`` on a raw socket (closing it is a real disconnect) and return it."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", int(env["url"].rsplit(":", 1)[1])))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: "
        + str(len(data)).encode() + b"\r\n\r\n" + data
    )  # fmt: skip
    return sock


def test_non_streamed_client_gone_stops_within_one_step(env) -> None:
    """A non-streamed client that leaves while its tokens flow: the server notices the
    disconnect at once (not after a pause in the tokens) and the engine drops the row
    at its next step. Each forward of the engine waits for a permit from this test, so
    the tokens are counted step by step whatever the machine's speed."""
    engine, model = env["app"].state.engine, env["app"].state.bank.model
    body = {"model": "sst2", "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    permits = threading.Semaphore(0)

    def gate(*_) -> None:  # a forward pre-hook: returns None (the inputs unchanged)
        permits.acquire()

    handle = model.register_forward_pre_hook(gate)
    req = dict(engine.requests)
    tokens0, gone0 = engine.tokens_generated, req.get("client_gone", 0)
    cancelled0, completed0 = req.get("cancelled", 0), req.get("completed", 0)

    def step() -> None:  # one forward; it yields a token (or the row was dropped)
        n = engine.tokens_generated
        permits.release()
        _wait(lambda: engine.tokens_generated > n
              or engine.requests["cancelled"] > cancelled0)  # fmt: skip

    try:
        sock = _raw_post(env, body)
        for _ in range(4):  # prefill + 3 decode steps: the row is generating
            step()
        assert engine.tokens_generated - tokens0 == 4
        sock.close()  # the client leaves
        for _ in range(150):  # tokens keep flowing until the server notices
            if engine.requests["client_gone"] > gone0:
                break
            step()
            time.sleep(0.01)
        else:
            pytest.fail("the server did not notice the client leaving while tokens flowed")
        at_notice = engine.tokens_generated
    finally:
        handle.remove()
        permits.release(1000)
    _wait(lambda: engine.requests["cancelled"] > cancelled0)
    assert engine.tokens_generated - at_notice <= 1  # at most the step in flight
    assert engine.tokens_generated - tokens0 < 150
    assert engine.requests["completed"] == completed0  # cancelled, not run to max_tokens
    _wait(lambda: engine.running == 0 and engine.queue_depth == 0)


def test_seeded_sampling_is_reproducible(env) -> None:
    body = {"model": "bbc", "prompt": PROMPTS[2], "max_tokens": 8, "temperature": 1.5,
            "top_p": 0.95}  # fmt: skip
    a = post(env, {**body, "seed": 7}).json()["choices"][0]["token_ids"]
    b = post(env, {**body, "seed": 7}).json()["choices"][0]["token_ids"]
    others = {tuple(post(env, {**body, "seed": s}).json()["choices"][0]["token_ids"])
              for s in (1, 2, 3)}  # fmt: skip
    assert a == b and len(a) > 0
    assert others != {tuple(a)}  # sampling really samples


def test_chat_without_a_chat_template_is_a_clear_400(env) -> None:
    body = {"model": "bbc", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(env["url"] + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"
    assert "chat template" in r.json()["error"]["message"]
