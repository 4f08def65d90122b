"""``prefixattn train --task NAME=FILE ...``: several prefixes trained in one run, in mixed
batches, each saved where ``serve --task`` and ``PrefixTuning.load`` find it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from prefixattn import MultiTaskPrefixTuning, PrefixTuning, TaskBank
from prefixattn.cli import main
from prefixattn.data import load_model
from prefixattn.testing import single_thread
from prefixattn.tiny import tiny_model, tiny_tokenizer

WORDS = ["red", "green", "blue", "cat", "dog", "bird", "sun", "moon", "star", "one", "two"]
ANSWERS = {
    "colour": {"cat": "red", "dog": "green", "bird": "blue"},
    "count": {"cat": "one", "dog": "two", "bird": "one"},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random Llama (saved) and one JSONL per task: '<noise> <task> of <animal> ?'."""
    d = tmp_path_factory.mktemp("tasks")
    tok = tiny_tokenizer([" ".join(WORDS) + " colour count of ?"])
    tiny_model(len(tok), arch="llama", seed=0).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    out = {"model": d / "model"}
    for task, answer in ANSWERS.items():
        rng = random.Random(task)
        rows = []
        for _ in range(40):
            animal = rng.choice(sorted(answer))
            noise = " ".join(rng.choice(WORDS[6:9]) for _ in range(3))
            rows.append(
                {"prompt": f"{noise} {task} of {animal} ?", "completion": f" {answer[animal]}"}
            )
        out[task] = d / f"{task}.jsonl"
        out[task].write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return out


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    got = capsys.readouterr()
    return rc, got.out, got.err


COMMON = ["--device", "cpu", "--steps", 30, "--batch-size", 8, "--lr", 0.1, "--seq-len", 16,
          "--eval-size", 8, "--no-progress"]  # fmt: skip


def test_train_two_tasks_in_mixed_batches(capsys, tmp_path: Path, files) -> None:
    out = tmp_path / "out"
    rc, stdout, err = run(
        capsys, "train", "--model", files["model"], "--task", f"colour={files['colour']}",
        "--task", f"count={files['count']}", "--task-tokens", "count=2", "-P", 4,
        "--out", out, *COMMON,
    )  # fmt: skip
    assert rc == 0, err
    assert "2 tasks in mixed batches" in stdout and "prefixattn serve" in stdout
    model, _ = load_model(str(files["model"]), device="cpu")
    mt = MultiTaskPrefixTuning.load(out, model)
    assert mt.task_lengths() == {"colour": 4, "count": 2}
    for task, P in (("colour", 4), ("count", 2)):
        info = json.loads((out / task / "prefixattn_train.json").read_text())
        assert info["task"] == task and info["num_virtual_tokens"] == P
        # each task's answer follows from its prompt: its held-out loss falls clearly
        assert info["eval_loss_after"] < 0.7 * info["eval_loss_before"], info
        pt = PrefixTuning.load(out / task, load_model(str(files["model"]), device="cpu")[0])
        assert torch.equal(pt.prefix, mt.task_prefix(task).detach())
    # served together: one bank from the two saved directories
    bank = TaskBank(load_model(str(files["model"]), device="cpu")[0],
                    {t: out / t for t in ANSWERS})  # fmt: skip
    assert bank.lengths == {"colour": 4, "count": 2}


def test_train_tasks_errors(capsys, tmp_path: Path, files) -> None:
    base = ["train", "--model", files["model"], "--out", tmp_path / "x", *COMMON]
    rc, _, err = run(capsys, *base, "--task", f"a={files['colour']}", "--method", "prompt")
    assert rc == 2 and "cannot share a mixed batch" in err
    rc, _, err = run(capsys, *base, "--task", f"a={files['colour']}", "--data", files["colour"])
    assert rc == 2 and "not both" in err
    rc, _, err = run(capsys, *base)
    assert rc == 2 and "--task NAME=FILE" in err
    rc, _, err = run(capsys, *base, "--task", f"a={files['colour']}", "--task-tokens", "b=3")
    assert rc == 2 and "no --task named 'b'" in err
    rc, _, err = run(
        capsys, *base, "--task", f"a={files['colour']}", "--task", f"a={files['count']}"
    )
    assert rc == 2 and "each NAME may appear once" in err


def test_demo_multi_task_tiny(capsys) -> None:
    """``prefixattn demo --tiny --multi-task``: the whole pipeline in seconds."""
    from prefixattn.demo import DemoConfig
    from prefixattn.demo_multitask import run_multitask_demo

    lines: list[str] = []
    res = run_multitask_demo(
        DemoConfig(tiny=True, steps=4, eval_size=10, progress=False), log=lines.append
    )
    for table in (res.zero_shot, res.separate, res.mixed):
        assert set(table) == {"topic", "headline"} and all(0 <= a <= 1 for a in table.values())
    assert res.mixed_seconds > 0 and res.separate_seconds > 0
    assert any(line.startswith("training wall time") for line in lines)
    rc, out, err = run(capsys, "demo", "--tiny", "--multi-task", "--steps", 2, "--no-progress")
    assert rc == 0, err
    assert "mixed - alone" in out
