"""lm-evaluation-harness ``local-completions`` against ``prefixattn serve`` on 127.0.0.1,
offline, on two tiny local JSONL tasks: one ``generate_until`` (whose ``until`` list plus
the EOS lm-eval appends makes 5 stop strings) and one ``multiple_choice`` (loglikelihood:
token-id prompts, ``echo``, ``logprobs``). The loglikelihoods lm-eval computes from the
server's answers are checked, choice by choice, against an independent float64 forward:
the plain model for the base, the task's saved prefix as cached keys/values of the
unpatched float64 model (``prefixattn.testing.concat_prefix_forward``) for the prefix task.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
pytest.importorskip("lm_eval")

import httpx
from serve_support import Server, byte_tokenizer

from prefixattn import PrefixTuning
from prefixattn.hf.testing import single_thread
from prefixattn.serve import create_app
from prefixattn.testing import concat_prefix_forward
from prefixattn.tiny import tiny_model

GEN = [
    {"question": "Q: the market rose on\nA:", "answer": "earnings"},
    {"question": "Q: 市场 😀 the team\nA:", "answer": "won"},
]
MC = [
    {"question": "the team won the", "choices": ["final", "market", "市场"], "label": 0},
    {"question": "Emoji list: 😀", "choices": [" 😃", " the", "!"], "label": 1},
    {"question": "the market", "choices": ["rose", "fell on strong earnings"], "label": 0},
]


def _write_tasks(root) -> None:
    for name, rows in (("gen", GEN), ("mc", MC)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (
        "dataset_path: json\n"
        "dataset_kwargs:\n  data_files:\n    test: {path}\n"
        "test_split: test\n"
        'doc_to_text: "{{{{question}}}}"\n'
    )
    (root / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common.format(path=root / "gen.jsonl")
        + 'doc_to_target: "{{answer}}"\noutput_type: generate_until\n'
        'generation_kwargs:\n  until: ["\\n", ".", "?", "!"]\n  max_gen_toks: 6\n'
        "  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n"
    )  # fmt: skip
    (root / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common.format(path=root / "mc.jsonl")
        + 'doc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "output_type: multiple_choice\nmetric_list:\n  - metric: acc\n"
    )  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with single_thread():
        tok = byte_tokenizer()
        model = tiny_model(len(tok), arch="llama", seed=4)
        ref = copy.deepcopy(model).double()
        # an EOS the model often picks: the argmax after "the team won the" (a second EOS id)
        ids = tok("the team won the")["input_ids"]
        with torch.no_grad():
            frequent = int(ref(torch.tensor([ids])).logits[0, -1].argmax())
        for cfg in (model.config, model.generation_config):
            cfg.bos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.pad_token_id
            cfg.eos_token_id = [tok.eos_token_id, frequent]
        root = tmp_path_factory.mktemp("lmeval")
        tok.save_pretrained(root / "tokenizer")
        torch.manual_seed(9)
        PrefixTuning(copy.deepcopy(model), 3, init="vocab").save(root / "t1")
        _write_tasks(root)
        app = create_app(copy.deepcopy(model), tok, {"t1": str(root / "t1")}, model_name="byte")
        with Server(app) as srv:
            yield dict(url=srv.url, tok=tok, ref=ref, root=root, frequent=frequent, ids=ids)


def test_eos_that_ends_a_choice_is_reported_with_logprobs(env) -> None:
    """lm-eval's loglikelihood request when the next token is an EOS: the entry after the
    prompt is still there (as vLLM), else lm-eval would drop the last prompt token."""
    body = {"model": "byte", "prompt": env["ids"], "max_tokens": 1, "echo": True,
            "logprobs": 1, "temperature": 0}  # fmt: skip
    choice = httpx.post(env["url"] + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert choice["token_ids"] == [env["frequent"]] and choice["finish_reason"] == "stop"
    assert len(choice["logprobs"]["token_logprobs"]) == len(env["ids"]) + 1
    plain = httpx.post(env["url"] + "/v1/completions", json={**body, "logprobs": None,
                       "echo": False}, timeout=60).json()["choices"][0]  # fmt: skip
    assert plain["token_ids"] == [] and plain["finish_reason"] == "stop"


def _ref_loglikelihood(env, model: str, context: str, continuation: str) -> float:
    """lm-eval's split of (context, continuation) into tokens; float64 reference of the
    base model, or of task ``t1`` (its saved prefix as cached keys/values, in float64)."""
    tok = env["tok"]
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        if model == "byte":
            logits = env["ref"](torch.tensor([whole])).logits[0]  # [N, V]
        else:
            prefix = PrefixTuning.read(env["root"] / model)[0].double()  # [L, 2, Hkv, P, D]
            logits = concat_prefix_forward(env["ref"], prefix, torch.tensor([whole])).logits[0]
        lp = torch.log_softmax(logits.double(), -1)  # [N, V]
    return sum(lp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))


@pytest.mark.parametrize("model", ["byte", "t1"])
def test_lm_eval_local_completions_end_to_end(env, model, monkeypatch) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(env["root"] / "hf_cache"))
    model_args = (
        f"model={model},base_url={env['url']}/v1/completions,"
        f"tokenizer={env['root'] / 'tokenizer'},tokenizer_backend=huggingface,"
        "num_concurrent=1,max_retries=1,timeout=60"
    )
    out = lm_eval.simple_evaluate(
        model="local-completions", model_args=model_args, tasks=["tiny_gen", "tiny_mc"],
        task_manager=TaskManager(include_path=str(env["root"]), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )  # fmt: skip
    assert set(out["results"]) == {"tiny_gen", "tiny_mc"}
    gens = out["samples"]["tiny_gen"]
    assert len(gens) == len(GEN) and all(isinstance(s["resps"][0][0], str) for s in gens)
    samples = out["samples"]["tiny_mc"]
    assert len(samples) == len(MC)
    correct = []
    for s in samples:
        lls = []
        for (context, continuation), resp in zip(s["arguments"], [r[0] for r in s["resps"]]):
            ll, _greedy = resp
            # the server runs float32: its sum over a few tokens is within 1e-4 of float64
            want = _ref_loglikelihood(env, model, context, continuation)
            assert ll == pytest.approx(want, abs=1e-4, rel=1e-5), (model, context, continuation)
            lls.append(want)
        correct.append(max(range(len(lls)), key=lls.__getitem__) == s["target"])
    # the accuracy is what the reference's log-likelihoods give
    assert out["results"]["tiny_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
