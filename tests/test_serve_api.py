"""The OpenAI API through real clients (the ``openai`` package, httpx) on 127.0.0.1: a
tiny random Llama with a byte-level BPE tokenizer (multi-byte characters split across
tokens) and a chat template, one prefix task, an API key and an admin token.

Logprobs are checked against an independent float64 log-softmax of a plain forward of
the unpatched model; the stream against the unstreamed response (a property over random
Unicode prompts); each of issue 19's eight bugs is pinned by the request that hit it.
"""

from __future__ import annotations

import copy
import json
import threading
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
pytest.importorskip("openai")

import httpx
import openai
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from serve_support import Server, WatchedTokenizer, byte_tokenizer

from prefixattn import PrefixTuning
from prefixattn.hf.testing import single_thread
from prefixattn.serve import create_app
from prefixattn.tiny import tiny_model

KEY, ADMIN = "k3y-for-tests", "adm1n"
AUTH = {"authorization": f"Bearer {KEY}"}
EMOJI = "Emoji list: 😀 😃 😄 😁 😆 😅 🤣 😂 🙂"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with single_thread():
        tok = byte_tokenizer()
        model = tiny_model(len(tok), arch="llama", seed=3)
        for cfg in (model.config, model.generation_config):
            cfg.eos_token_id, cfg.bos_token_id = tok.eos_token_id, tok.bos_token_id
            cfg.pad_token_id = tok.pad_token_id
        ref = copy.deepcopy(model).double()  # the unpatched model, float64: the reference
        root = tmp_path_factory.mktemp("tasks")
        torch.manual_seed(5)
        PrefixTuning(copy.deepcopy(model), 3, init="vocab").save(root / "t1")
        torch.manual_seed(6)
        PrefixTuning(copy.deepcopy(model), 2, init="vocab").save(root / "t2")
        app = create_app(
            copy.deepcopy(model), tok, {"t1": str(root / "t1")}, model_name="byte",
            admin_token=ADMIN, api_key=KEY, max_num_seqs=8, max_queue=64,
        )  # fmt: skip
        with Server(app) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
            yield dict(url=srv.url, app=app, tok=tok, ref=ref, root=root, client=client,
                       model=model)  # fmt: skip


@pytest.fixture(scope="module")
def watched(env):
    """A second server whose tokenizer records the thread of every call and blocks an
    encode of a prompt holding "GATE-" until the test releases it."""
    tok = WatchedTokenizer(env["tok"], gate_marker="GATE-")
    with single_thread():
        app = create_app(copy.deepcopy(env["model"]), tok, {"t1": str(env["root"] / "t1")},
                         model_name="byte", max_num_seqs=4, max_queue=16)  # fmt: skip
    with Server(app) as srv:
        yield dict(url=srv.url, app=app, tok=tok, server=srv)


def post(env, path: str, body, headers=AUTH, timeout: float = 60.0) -> httpx.Response:
    return httpx.post(env["url"] + path, json=body, headers=headers, timeout=timeout)


def ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def sse(env, path: str, body) -> list[dict]:
    out = []
    with httpx.stream("POST", env["url"] + path, json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])
    assert out[-1] == "[DONE]"
    return [json.loads(x) for x in out[:-1]]


def ref_logprobs(env, ids: list[int]) -> torch.Tensor:
    """float64 log-softmax of the plain model's logits at every position [N, V]."""
    with torch.no_grad():
        logits = env["ref"](torch.tensor([ids])).logits[0]  # [N, V]
    return torch.log_softmax(logits.double(), dim=-1)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


# ---------------------------------------------------------------------- chat


def test_openai_chat_plain_stream_usage_and_models(env) -> None:
    c = env["client"]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": EMOJI}]
    for model in ("byte", "t1"):
        got = c.chat.completions.create(model=model, messages=msgs, max_tokens=12, temperature=0)
        choice = got.choices[0]
        assert got.object == "chat.completion" and choice.message.role == "assistant"
        assert choice.finish_reason in ("stop", "length")
        stream = c.chat.completions.create(
            model=model, messages=msgs, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = list(stream)
        assert chunks[-1].choices == [] and chunks[-1].usage == got.usage
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1])
        assert text == choice.message.content
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-2].choices[0].finish_reason == choice.finish_reason
        # the prompt is the chat template's: /tokenize with the messages counts the same
        tk = ok(post(env, "/tokenize", {"model": model, "messages": msgs}))
        assert got.usage.prompt_tokens == tk["count"]
        want = env["tok"](
            env["tok"].apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
        assert tk["tokens"] == want
    card = c.models.retrieve("t1")
    # the model's 512 positions (the task's 3 prefix keys are the bank's, not the row's)
    assert card.id == "t1" and card.model_extra["max_model_len"] == 512
    assert {m.id for m in c.models.list()} == {"byte", "t1"}
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")


def test_chat_logprobs_match_completions_on_the_same_ids(env) -> None:
    c = env["client"]
    msgs = [{"role": "user", "content": "the market 市场"}]
    got = c.chat.completions.create(
        model="t1", messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens > 0
    ids = ok(post(env, "/tokenize", {"model": "t1", "messages": msgs}))["tokens"]
    comp = ok(post(env, "/v1/completions", {"model": "t1", "prompt": ids, "max_tokens": 6,
                                            "temperature": 0, "logprobs": 3}))  # fmt: skip
    lp = comp["choices"][0]["logprobs"]
    assert [e.logprob for e in content] == pytest.approx(lp["token_logprobs"], abs=1e-6)
    for e in content:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert e.logprob == pytest.approx(tops[0], abs=1e-6)  # greedy: the argmax
        assert e.bytes == list(e.token.encode("utf-8"))


def test_chat_refusals(env) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    err = error_of(post(env, "/v1/chat/completions",
                        {"model": "byte", "messages": msgs, "tools": [{"type": "function"}]}),
                   400)  # fmt: skip
    assert err["param"] == "tools"
    err = error_of(post(env, "/v1/chat/completions", {"model": "byte", "messages": []}), 422)
    assert "messages" in err["message"]
    img = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    error_of(post(env, "/v1/chat/completions", {"model": "byte", "messages": img}), 422)


# ---------------------------------------------------------------------- logprobs, echo


def test_completion_logprobs_equal_float64_reference(env) -> None:
    tok = env["tok"]
    prompt = tok("the market rose 😀")["input_ids"]
    body = {"model": "byte", "prompt": prompt, "max_tokens": 8, "temperature": 0,
            "logprobs": 4, "ignore_eos": True}  # fmt: skip
    choice = ok(post(env, "/v1/completions", body))["choices"][0]
    gen = choice["token_ids"]
    assert len(gen) == 8
    ref = ref_logprobs(env, prompt + gen)  # [N, V]
    lp = choice["logprobs"]
    for t, tid in enumerate(gen):
        row = ref[len(prompt) + t - 1]  # predicts gen[t]
        assert lp["token_logprobs"][t] == pytest.approx(row[tid].item(), abs=1e-4)
        assert tid == int(row.argmax())  # greedy
        top_vals = sorted(lp["top_logprobs"][t].values(), reverse=True)
        ref_top = row.topk(4).values.tolist()
        # token strings may collide (several bytes decode to U+FFFD): values are a subset
        assert all(any(abs(v - r) < 1e-4 for r in ref_top) for v in top_vals)
    assert lp["tokens"] == [tok.decode([i]) for i in gen]
    assert lp["text_offset"][0] == 0


def test_echo_max_tokens_zero_scores_the_prompt(env) -> None:
    """lm-eval's loglikelihood request: token ids, echo, logprobs, max_tokens 0 / 1."""
    tok = env["tok"]
    prompts = [tok("the team won")["input_ids"], tok("市场 😀 rose")["input_ids"]]
    body = {"model": "byte", "prompt": prompts, "max_tokens": 0, "echo": True,
            "logprobs": 2, "temperature": 0}  # fmt: skip
    got = ok(post(env, "/v1/completions", body))
    assert len(got["choices"]) == 2 and got["usage"]["completion_tokens"] == 0
    for ids, choice in zip(prompts, got["choices"]):
        assert choice["text"] == tok.decode(ids) and choice["finish_reason"] == "length"
        lp = choice["logprobs"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert len(lp["token_logprobs"]) == len(ids)
        ref = ref_logprobs(env, ids)
        want = [ref[i - 1, ids[i]].item() for i in range(1, len(ids))]
        assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
        for i in range(1, len(ids)):
            assert max(lp["top_logprobs"][i].values()) == pytest.approx(
                ref[i - 1].max().item(), abs=1e-4
            )
    # echo with generation: the prompt's text, then the new text; logprobs run on
    body = {**body, "prompt": "the team", "max_tokens": 3}
    choice = ok(post(env, "/v1/completions", body))["choices"][0]
    n_prompt = len(tok("the team")["input_ids"])
    assert choice["text"].startswith("the team")
    assert len(choice["logprobs"]["tokens"]) == n_prompt + len(choice["token_ids"])
    # max_tokens 0 without echo is still refused
    error_of(post(env, "/v1/completions", {"model": "byte", "prompt": "x", "max_tokens": 0}), 422)


def test_prefix_task_generation_logprobs_equal_its_prompt_scoring(env) -> None:
    """The logprobs reported while generating (KV cache) equal those of one forward of
    prompt + generated tokens (echo) for a prefix task: two independent engine paths."""
    prompt = env["tok"]("the market")["input_ids"]
    body = {"model": "t1", "prompt": prompt, "max_tokens": 6, "temperature": 0,
            "logprobs": 1, "ignore_eos": True}  # fmt: skip
    gen = ok(post(env, "/v1/completions", body))["choices"][0]
    scored = ok(post(env, "/v1/completions", {
        "model": "t1", "prompt": prompt + gen["token_ids"], "max_tokens": 0, "echo": True,
        "logprobs": 1}))["choices"][0]  # fmt: skip
    assert scored["logprobs"]["token_logprobs"][len(prompt) :] == pytest.approx(
        gen["logprobs"]["token_logprobs"], abs=1e-4
    )
    base = ok(post(env, "/v1/completions", {**body, "model": "byte"}))["choices"][0]
    assert base["logprobs"]["token_logprobs"] != gen["logprobs"]["token_logprobs"]


# ---------------------------------------------------------------------- prompts, n, stop


def test_token_prompts_n_and_seeds(env) -> None:
    tok = env["tok"]
    text = "the team won the final"
    ids = tok(text)["input_ids"]
    base = {"model": "t1", "max_tokens": 5, "temperature": 0}
    a = ok(post(env, "/v1/completions", {**base, "prompt": text}))["choices"][0]
    b = ok(post(env, "/v1/completions", {**base, "prompt": ids}))["choices"][0]
    c = ok(post(env, "/v1/completions", {**base, "prompt": [ids, ids[:3]]}))["choices"]
    assert a["token_ids"] == b["token_ids"] == c[0]["token_ids"]
    assert [x["index"] for x in c] == [0, 1]
    error_of(post(env, "/v1/completions", {**base, "prompt": [ids[0], 10**6]}), 400)
    sample = {"model": "t1", "prompt": text, "max_tokens": 6, "temperature": 1.0, "seed": 11}
    many = ok(post(env, "/v1/completions", {**sample, "n": 3}))
    assert [x["index"] for x in many["choices"]] == [0, 1, 2]
    assert many["usage"]["prompt_tokens"] == len(ids)  # once per prompt, not per choice
    for j, choice in enumerate(many["choices"]):  # choice j: seed + j
        alone = ok(post(env, "/v1/completions", {**sample, "seed": 11 + j}))["choices"][0]
        assert choice["token_ids"] == alone["token_ids"]
    assert len({tuple(x["token_ids"]) for x in many["choices"]}) > 1
    # best_of equal to n is n; more is refused
    ok(post(env, "/v1/completions", {**sample, "n": 2, "best_of": 2}))
    assert error_of(post(env, "/v1/completions", {**sample, "best_of": 3}), 400)["param"] == (
        "best_of"
    )


def test_any_number_of_stop_strings_and_stop_token_ids(env) -> None:
    body = {"model": "byte", "prompt": "the market", "max_tokens": 16, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    full = ok(post(env, "/v1/completions", body))["choices"][0]
    text, ids = full["text"], full["token_ids"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop and stop in text
    decoys = [f"never-{i}" for i in range(9)]
    want = text[: text.find(stop)]
    res = ok(post(env, "/v1/completions", {**body, "stop": [*decoys, stop]}))
    got = res["choices"][0]
    assert got["text"] == want and got["finish_reason"] == "stop"
    # the tokens reported end with the one that completed the stop string (the engine may
    # have run a step further: those tokens are not reported, nor counted)
    tok = env["tok"]
    k = next(i for i in range(1, len(ids) + 1) if stop in tok.decode(ids[:i]))
    if not tok.decode(ids[:k]).endswith("\ufffd"):  # else the match waits for a character
        assert got["token_ids"] == ids[:k]
    assert got["token_ids"] == ids[: len(got["token_ids"])]
    assert res["usage"]["completion_tokens"] == len(got["token_ids"])
    streamed = sse(env, "/v1/completions", {**body, "stop": [*decoys, stop], "stream": True})
    assert "".join(c["choices"][0]["text"] for c in streamed) == want
    kept = ok(post(env, "/v1/completions", {**body, "stop": stop,
                                            "include_stop_str_in_output": True}))  # fmt: skip
    assert kept["choices"][0]["text"] == text[: text.find(stop) + len(stop)]
    sid = ids[4]
    got = ok(post(env, "/v1/completions", {**body, "stop_token_ids": [sid]}))["choices"][0]
    assert got["token_ids"] == ids[: ids.index(sid)] and got["finish_reason"] == "stop"


def test_completion_stream_usage_and_logprobs_chunks(env) -> None:
    body = {"model": "t1", "prompt": EMOJI, "max_tokens": 10, "temperature": 0, "logprobs": 2,
            "echo": True}  # fmt: skip
    full = ok(post(env, "/v1/completions", body))
    chunks = sse(env, "/v1/completions", {**body, "stream": True,
                                          "stream_options": {"include_usage": True}})  # fmt: skip
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    parts = [c["choices"][0] for c in chunks[:-1]]
    choice = full["choices"][0]
    assert "".join(p["text"] for p in parts) == choice["text"]
    lps = [x for p in parts if p["logprobs"] for x in p["logprobs"]["token_logprobs"]]
    assert lps == pytest.approx(choice["logprobs"]["token_logprobs"], abs=0)
    offs = [x for p in parts if p["logprobs"] for x in p["logprobs"]["text_offset"]]
    assert offs == choice["logprobs"]["text_offset"]


# ---------------------------------------------------------------------- bug 1: streaming


def _split_chars(tok, ids: list[int]) -> int:
    """How many valid multi-byte characters of the output span a token boundary."""
    # GPT-2's byte <-> printable character map (what ByteLevel tokens are spelled with)
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    cs = bs[:] + [256 + i for i in range(256 - len(bs))]
    bs += [b for b in range(256) if b not in bs]
    back = {chr(c): b for b, c in zip(bs, cs)}
    pieces = [bytes(back[ch] for ch in tok.convert_ids_to_tokens(i)) for i in ids
              if i not in tok.all_special_ids]  # fmt: skip
    data, bounds, pos = b"".join(pieces), set(), 0
    for p in pieces:
        pos += len(p)
        bounds.add(pos)
    count, i = 0, 0
    while i < len(data):
        b = data[i]
        n = 2 if 0xC2 <= b <= 0xDF else 3 if 0xE0 <= b <= 0xEF else 4 if 0xF0 <= b <= 0xF4 else 1
        if n > 1:
            try:
                data[i : i + n].decode("utf-8")
            except UnicodeDecodeError:
                n = 1
            else:
                count += any(i < x < i + n for x in bounds)
        i += n
    return count


def test_bug1_streamed_text_equals_unstreamed_for_split_characters(env) -> None:
    """The issue's request (sampled over seeds so that characters split across tokens
    occur): every stream equals the unstreamed text and the tokens' decode; no piece
    holds a broken character the final text does not have."""
    tok, split = env["tok"], 0
    body = {"model": "byte", "prompt": EMOJI, "max_tokens": 40, "temperature": 1.0,
            "ignore_eos": True}  # fmt: skip
    for seed in range(12):
        full = ok(post(env, "/v1/completions", {**body, "seed": seed}))["choices"][0]
        assert full["text"] == tok.decode(full["token_ids"], skip_special_tokens=True)
        parts = [c["choices"][0]["text"] for c in
                 sse(env, "/v1/completions", {**body, "seed": seed, "stream": True})]  # fmt: skip
        assert "".join(parts) == full["text"]
        split += _split_chars(tok, full["token_ids"])
    assert split > 0, "no character was split across tokens: the test did not test"


_UNICODE = st.text(
    alphabet=st.one_of(
        st.characters(min_codepoint=0x20, max_codepoint=0x7E),
        st.characters(min_codepoint=0x4E00, max_codepoint=0x4FFF),  # CJK
        st.characters(min_codepoint=0x1F600, max_codepoint=0x1F64F),  # emoji
        st.characters(codec="utf-8", exclude_categories=("Cs",)),
    ),
    min_size=1,
    max_size=24,
)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(prompt=_UNICODE, seed=st.integers(0, 2**32), chat=st.booleans())
def test_property_stream_equals_unstreamed(env, prompt, seed, chat) -> None:
    if chat:
        body = {"model": "t1", "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 12, "temperature": 1.0, "seed": seed}  # fmt: skip
        full = ok(post(env, "/v1/chat/completions", body))["choices"][0]["message"]["content"]
        parts = sse(env, "/v1/chat/completions", {**body, "stream": True})
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in parts)
    else:
        body = {"model": "t1", "prompt": prompt, "max_tokens": 12, "temperature": 1.0,
                "seed": seed}  # fmt: skip
        choice = ok(post(env, "/v1/completions", body))["choices"][0]
        full = choice["text"]
        assert full == env["tok"].decode(choice["token_ids"], skip_special_tokens=True)
        parts = sse(env, "/v1/completions", {**body, "stream": True})
        streamed = "".join(c["choices"][0]["text"] for c in parts)
    assert streamed == full


# ---------------------------------------------------------------------- bugs 2-5


def test_bug2_body_limit_and_tokenization_off_the_event_loop(env, watched) -> None:
    big = "x" * (10 * 1024 * 1024)
    err = error_of(post(env, "/v1/completions", {"model": "byte", "prompt": big}), 413)
    assert err["code"] == "request_too_large"
    # a prompt's encode is held (the tokenizer blocks until released): /health answers
    # meanwhile, so the tokenization does not run on the event loop
    tok, done = watched["tok"], {}
    tok.entered.clear()
    tok.release.clear()
    body = {"model": "byte", "prompt": "GATE- the market", "max_tokens": 2, "temperature": 0}
    th = threading.Thread(
        target=lambda: done.setdefault(
            "r", httpx.post(watched["url"] + "/v1/completions", json=body, timeout=120)
        )
    )
    th.start()
    try:
        assert tok.entered.wait(60), "the encode never started"
        r = httpx.get(watched["url"] + "/health", timeout=30)
        assert r.status_code == 200 and "r" not in done  # answered while the encode waits
    finally:
        tok.release.set()
    th.join(120)
    assert done["r"].status_code == 200, done["r"].text


@pytest.mark.parametrize(
    "path,raw,param",
    [
        ("/v1/completions", '{"model":"byte","prompt":"the \\ud800 market"}', "prompt"),
        ("/v1/completions", '{"model":"byte","prompt":"x","stop":["\\udfff"]}', "stop"),
        ("/v1/chat/completions",
         '{"model":"byte","messages":[{"role":"user","content":"a\\ud83d"}]}', "messages"),
        ("/tokenize", '{"prompt":"\\ud800"}', "prompt"),
    ],
)  # fmt: skip
def test_bug3_lone_surrogates_get_a_json_4xx(env, path, raw, param) -> None:
    r = httpx.post(env["url"] + path, content=raw.encode(),
                   headers={**AUTH, "content-type": "application/json"}, timeout=30)  # fmt: skip
    err = error_of(r, 422)
    assert err["param"].startswith(param) and "surrogate" in err["message"]
    assert httpx.get(env["url"] + "/health", timeout=10).status_code == 200


def test_bug4_bug5_seed_range_and_tiny_temperature(env) -> None:
    body = {"model": "byte", "prompt": "the market", "max_tokens": 4, "temperature": 1.0}
    assert error_of(post(env, "/v1/completions", {**body, "seed": 2**64}), 422)["param"] == "seed"
    ok(post(env, "/v1/completions", {**body, "seed": 2**64 - 1}))
    greedy = ok(post(env, "/v1/completions", {**body, "temperature": 0}))["choices"][0]
    tiny = ok(post(env, "/v1/completions", {**body, "temperature": 5e-324}))["choices"][0]
    assert tiny["token_ids"] == greedy["token_ids"]


# ---------------------------------------------------------------------- admin: bugs 6-8


def _corrupt(env, name: str, fix) -> str:
    import shutil

    path = env["root"] / name
    shutil.copytree(env["root"] / "t2", path)
    fix(path)
    return str(path)


def test_bug6_corrupt_artifacts_get_400(env) -> None:
    adm = {"authorization": f"Bearer {ADMIN}"}

    def no_layers(p):
        cfg = json.loads((p / "prefixattn_prefix.json").read_text())
        del cfg["num_layers"]
        (p / "prefixattn_prefix.json").write_text(json.dumps(cfg))

    cases = {
        "garbage": lambda p: (p / "prefix.safetensors").write_bytes(b"garbage" * 9),
        "cfglist": lambda p: (p / "prefixattn_prefix.json").write_text("[]"),
        "nolayers": no_layers,
    }
    for name, fix in cases.items():
        body = {"name": name, "path": _corrupt(env, name, fix)}
        err = error_of(post(env, "/admin/tasks", body, headers=adm), 400)
        assert err["code"] == "bad_artifact", name
    assert httpx.get(env["url"] + "/health", timeout=10).status_code == 200


def test_bug7_bug8_auth_names_removal_and_retry_after(env) -> None:
    url, adm = env["url"], {"authorization": f"Bearer {ADMIN}"}
    # 7: non-ASCII Authorization headers are refused (401), on admin and inference routes
    for path in ("/admin/tasks", "/v1/completions"):
        r = httpx.post(url + path, content=b"{}",
                       headers=[(b"authorization", "Bearer é✓".encode())], timeout=10)  # fmt: skip
        assert error_of(r, 401)["type"] == "authentication_error"
    # 8: the token is checked before the body (no schema leaks), names fit a URL segment
    assert error_of(post(env, "/admin/tasks", {"bad": 1}, headers={}), 401)
    assert error_of(post(env, "/admin/tasks", {"bad": 1}, headers=AUTH), 401)  # API key
    assert error_of(post(env, "/admin/tasks", {"bad": 1}, headers=adm), 422)
    r = post(env, "/admin/tasks", {"name": "a/b", "path": str(env["root"] / "t2")}, headers=adm)
    assert error_of(r, 422)["param"] == "name"
    r = post(env, "/admin/tasks", {"name": "a:b", "path": str(env["root"] / "t2")}, headers=adm)
    assert r.status_code == 201, r.text
    assert httpx.delete(url + "/admin/tasks/a:b", headers=adm, timeout=10).status_code == 200
    # 8: a request queued for a task that is then removed gets 404 (not a retried 5xx)
    r = post(env, "/admin/tasks", {"name": "gone", "path": str(env["root"] / "t2")}, headers=adm)
    assert r.status_code == 201, r.text
    engine, results = env["app"].state.engine, {}
    engine.model_lock.acquire()
    try:
        batches = engine.batches
        blocker = threading.Thread(
            target=lambda: results.setdefault(
                "a", post(env, "/v1/completions", {"model": "byte", "prompt": "x", "max_tokens": 2})
            )
        )
        blocker.start()
        _wait(lambda: engine.batches > batches)
        queued = threading.Thread(
            target=lambda: results.setdefault(
                "b", post(env, "/v1/completions", {"model": "gone", "prompt": "x", "max_tokens": 2})
            )
        )
        queued.start()
        _wait(lambda: engine.queue_depth == 1)
        assert httpx.delete(url + "/admin/tasks/gone", headers=adm, timeout=10).status_code == 200
        # 429 with Retry-After
        old, engine.max_queue = engine.max_queue, 1
        try:
            r = post(env, "/v1/completions", {"model": "byte", "prompt": "x", "max_tokens": 1})
            assert error_of(r, 429)["code"] == "queue_full"
            assert int(r.headers["retry-after"]) >= 1
        finally:
            engine.max_queue = old
    finally:
        engine.model_lock.release()
    blocker.join(60)
    queued.join(60)
    assert results["a"].status_code == 200
    assert error_of(results["b"], 404)["code"] == "model_not_found"


def _wait(cond, timeout: float = 20.0) -> None:
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "condition not reached"
        time.sleep(0.02)


# ---------------------------------------------------------------------- errors, auth, metrics


def test_every_layer_answers_in_openai_error_shape(env) -> None:
    url = env["url"]
    assert error_of(httpx.get(url + "/nope", timeout=10), 404)["code"] == "not_found"
    r = httpx.get(url + "/v1/completions", headers=AUTH, timeout=10)
    assert error_of(r, 405)["code"] == "method_not_allowed" and "POST" in r.headers["allow"]
    r = httpx.post(url + "/v1/completions", content=b'{"model": ', headers={
        **AUTH, "content-type": "application/json"}, timeout=10)  # fmt: skip
    assert error_of(r, 400)["code"] == "invalid_json"
    assert error_of(post(env, "/v1/completions", {"model": "byte"}), 422)["param"] == "prompt"
    assert error_of(post(env, "/v1/completions", {"model": "no", "prompt": "x"}), 404)[
        "code"] == "model_not_found"  # fmt: skip
    # the API key: required on inference routes and /metrics.json (it names every task);
    # not on /health nor Prometheus' /metrics
    assert error_of(post(env, "/v1/completions", {}, headers={}), 401)
    assert error_of(httpx.get(url + "/metrics.json", timeout=10), 401)
    assert "tasks" in ok(httpx.get(url + "/metrics.json", headers=AUTH, timeout=10))
    assert httpx.get(url + "/metrics", timeout=10).status_code == 200
    assert error_of(post(env, "/v1/completions", {}, headers={"authorization": "Bearer x"}), 401)
    assert error_of(httpx.get(url + "/v1/models", timeout=10), 401)
    assert error_of(post(env, "/tokenize", {"prompt": "x"}, headers={}), 401)
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(url + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize(
    "field,value",
    [("logit_bias", {"5": 10}), ("presence_penalty", 0.5), ("frequency_penalty", 1.0),
     ("suffix", "end"), ("top_k", 5), ("min_p", 0.1), ("repetition_penalty", 1.2),
     ("use_beam_search", True), ("guided_json", {}), ("some_new_field", 1)],
)  # fmt: skip
def test_unimplemented_fields_are_refused_by_name(env, field, value) -> None:
    body = {"model": "byte", "prompt": "x", "max_tokens": 1, field: value}
    err = error_of(post(env, "/v1/completions", body), 400)
    assert err["param"] == field and field in err["message"]


def test_no_op_values_and_harmless_fields_are_accepted(env) -> None:
    body = {"model": "byte", "prompt": "x", "max_tokens": 1, "presence_penalty": 0,
            "frequency_penalty": 0.0, "logit_bias": {}, "user": "u1", "best_of": 1}  # fmt: skip
    ok(post(env, "/v1/completions", body))


def test_tokenize_detokenize(env) -> None:
    tok = env["tok"]
    got = ok(post(env, "/tokenize", {"prompt": EMOJI, "return_token_strs": True}))
    assert got["tokens"] == tok(EMOJI)["input_ids"] and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == 512 and len(got["token_strs"]) == got["count"]
    assert ok(post(env, "/detokenize", {"tokens": got["tokens"]}))["prompt"] == EMOJI
    assert ok(post(env, "/tokenize", {"model": "t1", "prompt": "x"}))["count"] == 1
    error_of(post(env, "/detokenize", {"tokens": [10**7]}), 400)
    error_of(post(env, "/tokenize", {"model": "nope", "prompt": "x"}), 404)


def _samples(env) -> dict:
    text = httpx.get(env["url"] + "/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_prometheus_metrics(env) -> None:
    before = _samples(env)
    body = {"model": "t1", "prompt": "the market", "max_tokens": 5, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    usage = ok(post(env, "/v1/completions", body))["usage"]
    error_of(post(env, "/v1/completions", {**body, "suffix": "x"}), 400)
    after = _samples(env)

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("vllm:generation_tokens_total", model_name="t1") == 5
    assert delta("vllm:prompt_tokens_total", model_name="t1") == usage["prompt_tokens"]
    assert delta("vllm:time_to_first_token_seconds_count", model_name="t1") == 1
    assert delta("vllm:e2e_request_latency_seconds_count", model_name="t1") == 1
    assert delta("vllm:request_success_total", model_name="t1", finished_reason="length") == 1
    assert delta("prefixattn:requests_total", task="t1", outcome="length") == 1
    assert delta("prefixattn:requests_total", task="t1", outcome="invalid") == 1
    assert after[("vllm:num_requests_waiting", ())] == 0
    assert after[("vllm:num_requests_running", ())] == 0
    # the gauges while the engine is held: one row in the held step, two waiting
    engine, results = env["app"].state.engine, {}
    engine.model_lock.acquire()
    try:
        batches = engine.batches
        first = threading.Thread(
            target=lambda: results.setdefault("a", post(env, "/v1/completions", body))
        )
        first.start()
        _wait(lambda: engine.batches > batches)
        rest = threading.Thread(
            target=lambda: results.setdefault(
                "b", post(env, "/v1/completions", {**body, "prompt": ["x", "the"]})
            )
        )
        rest.start()
        _wait(lambda: engine.queue_depth == 2)
        held = _samples(env)
        assert held[("vllm:num_requests_running", ())] == 1
        assert held[("vllm:num_requests_waiting", ())] == 2
    finally:
        engine.model_lock.release()
    first.join(60)
    rest.join(60)
    assert results["a"].status_code == 200 and results["b"].status_code == 200
    final = _samples(env)
    assert final[("vllm:num_requests_running", ())] == 0
    key = ("prefixattn:requests_total", (("outcome", "length"), ("task", "t1")))
    assert final[key] - after[key] == 2  # two requests (one of two rows)
    gen = ("vllm:generation_tokens_total", (("model_name", "t1"),))
    assert final[gen] - after[gen] == 15  # three rows of 5 tokens


def test_prometheus_kv_and_prefix_cache(env) -> None:
    """The paged cache's metrics read the engine's own numbers: a prompt sent twice under
    one task hits the prefix cache the second time (every full block of it)."""
    engine = env["app"].state.engine
    body = {"model": "t1", "prompt": "the market rallied as the bank held its rates " * 2,
            "max_tokens": 1, "temperature": 0}  # fmt: skip
    before = _samples(env)
    ok(post(env, "/v1/completions", body))
    mid = _samples(env)
    ok(post(env, "/v1/completions", body))
    after = _samples(env)
    n = (("vllm:prefix_cache_queries_total", ()), ("vllm:prefix_cache_hits_total", ()))
    q1, h1 = (mid[k] - before[k] for k in n)
    q2, h2 = (after[k] - mid[k] for k in n)
    prompt_tokens = len(env["tok"](body["prompt"])["input_ids"])
    full = prompt_tokens // engine.kv.block_size
    assert full >= 2 and q1 == q2 >= 1 and h2 == q2 and h1 < q1, (q1, h1, q2, h2, full)
    stats = engine.kv.stats()
    assert after[("vllm:prefix_cache_hits_total", ())] == stats["hits"]
    assert after[("vllm:prefix_cache_queries_total", ())] == stats["queries"]
    assert after[("vllm:kv_cache_usage_perc", ())] == 0.0  # idle: no row holds a block
    assert after[("vllm:num_preemptions_total", ())] == engine.scheduler.num_preemptions


# ---------------------------------------------------------------------- limits (issue 26)


def test_tokenizer_used_from_one_thread_never_the_loop_nor_the_engine(watched) -> None:
    """Every tokenizer call (encode, decode in the output sinks, chat template, token
    strings, echo) runs on one thread: not the event loop's, not the engine's."""
    url, tok = watched["url"], watched["tok"]
    tok.threads.clear()
    base = {"model": "t1", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    ids = watched["tok"]._tok("the market")["input_ids"]
    for body in (
        {**base, "prompt": ["the market", EMOJI], "stop": ["zz", "q"], "n": 2},
        {**base, "prompt": ids, "echo": True, "logprobs": 2},
        {**base, "prompt": EMOJI, "stream": True},
    ):
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
    chat = {"model": "byte", "messages": [{"role": "user", "content": EMOJI}],
            "max_tokens": 4, "logprobs": True, "top_logprobs": 2}  # fmt: skip
    assert httpx.post(url + "/v1/chat/completions", json=chat, timeout=60).status_code == 200
    r = httpx.post(url + "/tokenize", json={"prompt": EMOJI, "return_token_strs": True},
                   timeout=60)  # fmt: skip
    assert r.status_code == 200
    r = httpx.post(url + "/detokenize", json={"tokens": r.json()["tokens"]}, timeout=60)
    assert r.status_code == 200
    methods = {m for m, _ in tok.threads}
    assert {"__call__", "decode", "apply_chat_template", "convert_ids_to_tokens"} <= methods
    threads = {t for _, t in tok.threads}
    engine_thread = watched["app"].state.engine._thread.name
    loop_thread = watched["server"].thread.name
    assert engine_thread not in threads and loop_thread not in threads, threads
    assert len(threads) == 1, threads


LONG = "x" * 300


@pytest.mark.parametrize(
    "change,param,limit",
    [
        ({"stop": [f"s{i}" for i in range(33)]}, "stop", "32"),
        ({"stop": ["ok", LONG]}, "stop", "256"),
        ({"stop_token_ids": list(range(65))}, "stop_token_ids", "64"),
        ({"prompt": ["x"] * 65}, "prompt", "64"),
    ],
)  # fmt: skip
def test_what_one_request_may_cost_is_bounded(env, change, param, limit) -> None:
    """Each over-limit request: a 400 naming the field and the limit (no queue)."""
    body = {"model": "byte", "prompt": "x", "max_tokens": 1, **change}
    for path, b in (("/v1/completions", body),
                    ("/v1/chat/completions", {**{k: v for k, v in body.items() if k != "prompt"},
                                              "messages": [{"role": "user", "content": "x"}]})):  # fmt: skip
        if param == "prompt" and path != "/v1/completions":
            continue
        err = error_of(post(env, path, b), 400)
        assert err["param"] == param and limit in err["message"], err
    ok(post(env, "/v1/completions", {**body, **{k: v[:1] for k, v in change.items()}}))


def test_a_request_that_can_never_fit_the_queue_gets_400(env) -> None:
    """More rows (prompts x n) than the queue holds (--max-queue 64 here): 400, not a 429
    that the client would retry forever; a request that fits may get 429 while full."""
    body = {"model": "byte", "prompt": ["x"] * 5, "max_tokens": 1, "n": 13}  # 65 rows
    err = error_of(post(env, "/v1/completions", body), 400)
    assert err["code"] == "too_many_rows" and "64" in err["message"] and "--max-queue" in (
        err["message"])  # fmt: skip
    chat = {"model": "byte", "messages": [{"role": "user", "content": "x"}], "n": 3}
    engine = env["app"].state.engine
    old, engine.max_queue = engine.max_queue, 2
    try:
        assert error_of(post(env, "/v1/chat/completions", chat), 400)["code"] == "too_many_rows"
    finally:
        engine.max_queue = old
    ok(post(env, "/v1/completions", {**body, "n": 12}))  # 60 rows fit


def test_token_id_prompt_length_is_checked_as_a_whole_first(env) -> None:
    """A token-id prompt longer than the context is refused for its length before any
    id is looked at (the ids' range is then checked in one pass)."""
    long = [5] * 600 + [10**6]
    err = error_of(post(env, "/v1/completions", {"model": "byte", "prompt": long}), 400)
    assert err["code"] == "context_length_exceeded"
    err = error_of(post(env, "/v1/completions", {"model": "byte", "prompt": [5, 10**6]}), 400)
    assert err["code"] == "invalid_token_id" and str(10**6) in err["message"]


def test_per_task_series_are_bounded() -> None:
    """A task folder may serve thousands of tasks: per-task series carry the first
    ``max_task_labels`` names, later tasks are counted under "other" (nothing is lost)."""
    from types import SimpleNamespace

    from prefixattn.serve.openai.metrics import ServeMetrics

    m = ServeMetrics(SimpleNamespace(running=0, queue_depth=0), max_task_labels=2)
    for task in ("base", "a", "b", "c", "a"):
        m.row_done(task, "length", 3, 2, 0.01, 0.1)
        m.request(task, "length")
    got = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            if s.name == "vllm:generation_tokens_total":
                got[s.labels["model_name"]] = s.value
    assert got == {"base": 2.0, "a": 4.0, "other": 4.0}, got
