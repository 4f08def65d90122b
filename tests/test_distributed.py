"""Distributed training on torch.distributed: ``prefixattn train`` under ``torchrun``.

Two gloo CPU processes (DDP over the prefix, or FSDP2 over the frozen base) must train the
same prefix as one process on the same global batches. The shards get different numbers
of label tokens, so a wrong loss normalisation (a mean of per-process means) or a missing
gradient all-reduce shows as a different prefix.
"""

from __future__ import annotations

import gc
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

from prefixattn.artifacts import TRAIN_INFO
from prefixattn.cli import main
from prefixattn.distributed import DistributedContext, init_distributed, shard_batch, wrap_ddp
from prefixattn.hf.prefix_tuning import read_prefix
from prefixattn.testing import single_thread, tiny_gpt2
from prefixattn.tiny import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["red", "green", "blue", "cat", "dog", "bird", "sun", "moon", "star", "one", "two"]
TRAIN_ARGS = ["--device", "cpu", "--steps", "4", "--batch-size", "6", "--eval-size", "4",
              "--lr", "1e-2", "--no-progress", "--seed", "3"]  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 (no dropout) + tokenizer, and prompt/completion records whose
    completions have different lengths (the shards get different label token counts)."""
    d = tmp_path_factory.mktemp("dist")
    tok = tiny_tokenizer([" ".join(WORDS) + " colour of ?"])
    model = tiny_gpt2(vocab_size=len(tok), pad_token_id=0, bos_token_id=2, eos_token_id=3)
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    rng = random.Random(0)
    lines = []
    for _ in range(24):
        animal = rng.choice(["cat", "dog", "bird"])
        noise = " ".join(rng.choice(WORDS[6:]) for _ in range(rng.randint(1, 6)))
        completion = " ".join(rng.choice(WORDS[:3]) for _ in range(rng.randint(1, 4)))
        lines.append(json.dumps({"prompt": f"{noise} colour of {animal} ?",
                                 "completion": " " + completion}))  # fmt: skip
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    return d


def train_single(workdir: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    with single_thread():
        rc = main(["train", "--data", str(workdir / "train.jsonl"), "--model",
                   str(workdir / "model"), "--out", str(out), *TRAIN_ARGS])  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def torchrun(workdir: Path, out: Path, *extra: str, nproc: int = 2) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "prefixattn.cli", "train",
           "--data", str(workdir / "train.jsonl"), "--model", str(workdir / "model"),
           "--out", str(out), *TRAIN_ARGS, *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180, cwd=workdir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_the_single_process_prefix(workdir, tmp_path, capsys, mode) -> None:
    single = tmp_path / "single"
    out_1 = train_single(workdir, single, capsys)
    multi = tmp_path / mode
    out_2 = torchrun(workdir, multi, *(["--fsdp"] if mode == "fsdp" else []))

    kind = "FSDP2-sharded base" if mode == "fsdp" else "DDP"
    assert f"distributed: 2 processes (gloo, {kind})" in out_2
    assert out_2.count("saved prefix artifact") == 1, out_2  # rank 0 alone writes
    assert out_2.count("eval loss before training") == 1  # and prints

    a, _ = read_prefix(single)
    b, meta = read_prefix(multi)
    assert meta["num_layers"] == 2 and a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err < 1e-5, f"2-process prefix differs from the 1-process prefix by {err:.2e}"
    info_1 = json.loads((single / TRAIN_INFO).read_text())
    info_2 = json.loads((multi / TRAIN_INFO).read_text())
    assert info_2["eval_loss_after"] == pytest.approx(info_1["eval_loss_after"], abs=1e-5)
    assert info_2["eval_loss_after"] < info_2["eval_loss_before"] - 1e-3  # it trained
    # the global-batch loss rank 0 reports equals the single process's
    last = next(line for line in out_2.splitlines() if "last loss" in line).split()[-1]
    last_1 = next(line for line in out_1.splitlines() if "last loss" in line).split()[-1]
    assert float(last) == pytest.approx(float(last_1), abs=1e-3)


# --------------------------------------------------------------------------------------
# pieces, in one process
# --------------------------------------------------------------------------------------


def test_shard_batch_rows_and_loss_scale() -> None:
    ids = torch.arange(5 * 4).view(5, 4)
    labels = ids.clone()
    labels[0, :] = -100
    labels[3, 2:] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    global_tokens = int((labels[:, 1:] != -100).sum())  # 15 - 3 - 2 = 10
    shards = [shard_batch(batch, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([s["input_ids"] for s in shards]), ids)
    assert [len(s["labels"]) for s in shards] == [2, 3]
    for s in shards:
        assert s["num_items_in_batch"] == pytest.approx(global_tokens / 2)
    with pytest.raises(ValueError, match="batch_size"):
        shard_batch(batch, 0, 6)
    with pytest.raises(ValueError, match="rank"):
        shard_batch(batch, 2, 2)


def test_single_process_context_is_a_no_op(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_distributed("cpu")
    assert not ctx.is_distributed and ctx.is_main
    batch = {"input_ids": torch.zeros(3, 2, dtype=torch.long)}
    assert ctx.shard(batch) is batch
    sentinel = torch.nn.Linear(2, 2)
    assert ctx.prepare(sentinel) is sentinel
    assert ctx.device_spec("auto") == "auto"
    with pytest.raises(ValueError, match="backend"):
        init_distributed("cpu", backend="mpi")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="device"):
        init_distributed("cuda:1")


def test_ddp_synchronises_only_the_prefix(tmp_path) -> None:
    """DDP gets the frozen base in its ignore list: no broadcast, no gradient buckets."""
    import prefixattn

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    ddp = None
    try:
        pt = prefixattn.PrefixTuning(tiny_gpt2(), 3)
        ddp = wrap_ddp(pt)
        synced = {n for n, _ in pt.named_parameters() if n not in ddp.parameters_to_ignore}
        assert synced == {"prefix"}
        base = {f"model.{n}" for n, _ in pt.model.named_parameters()}
        assert base <= set(ddp.parameters_to_ignore)
        ids = torch.randint(2, 128, (2, 5))
        ddp(input_ids=ids, labels=ids).loss.backward()
        assert pt.prefix.grad is not None and pt.prefix.grad.abs().max() > 0
        assert all(p.grad is None for p in pt.model.parameters())
    finally:
        # DDP's reducer holds the group: freed after destroy_process_group, a Gloo group's
        # destructor can wait forever on a lock (seen: CI hung here at the test's end)
        del ddp
        gc.collect()
        dist.destroy_process_group()


def test_close_frees_the_ddp_reducers_before_destroying_the_group(tmp_path) -> None:
    """``DistributedContext.close``: the DDP modules ``prepare`` made lose their reducer
    (which holds the process group) before the group is destroyed, so nothing frees a
    reducer over a destroyed Gloo group later (that destructor can hang)."""
    import prefixattn

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:  # a one-process group under a context that takes itself for a job of two
        ctx = DistributedContext(rank=0, world_size=2, backend="gloo")
        pt = prefixattn.PrefixTuning(tiny_gpt2(), 3)
        ddp = ctx.prepare(pt)
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        ids = torch.randint(2, 128, (2, 5))
        ddp(input_ids=ids, labels=ids).loss.backward()
        assert hasattr(ddp, "reducer")
        ctx.close()
        assert not hasattr(ddp, "reducer") and not hasattr(ddp, "logger")
        assert not dist.is_initialized()
        del ddp
        gc.collect()  # nothing left that holds the destroyed group
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_context_reduce_result_is_identity_single() -> None:
    from prefixattn.training import TrainResult

    r = TrainResult(losses=[1.0, 2.0], seconds=1.5, tokens=10)
    assert DistributedContext().reduce_result(r) is r and r.losses == [1.0, 2.0]
