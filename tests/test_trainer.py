"""PrefixTuning / PromptTuning under transformers' Trainer and TRL's SFTTrainer with default
arguments: labels reach the loss, checkpoints hold only the trained tensors (loadable with
``.load``), resume continues exactly, load_best_model_at_end, gradient checkpointing, eval,
and two torchrun processes train the one-process tuner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
datasets = pytest.importorskip("datasets")

from safetensors.torch import load_file  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from prefixattn import PrefixTuning, PromptTuning  # noqa: E402
from prefixattn.hf.tuner import STATE_META_KEY, TRAINER_WEIGHTS_NAME  # noqa: E402
from prefixattn.testing import concat_prefix_forward, single_thread, tiny_gpt2  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["prefix", "prefix_mlp", "prompt"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def make_tuner(kind: str, seed: int = 0, model: torch.nn.Module | None = None):
    """A tuner of ``kind`` on a fresh tiny GPT-2 (no dropout), seeded init."""
    model = model if model is not None else tiny_gpt2()
    torch.manual_seed(seed)
    if kind == "prefix":
        return PrefixTuning(model, 3, backend="sdpa", init_std=0.5)
    if kind == "prefix_mlp":
        return PrefixTuning(model, 3, backend="sdpa", prefix_projection=True, encoder_hidden_size=8)
    return PromptTuning(model, 3, init="vocab", seed=seed)


def dataset(n: int = 16, length: int = 7, seed: int = 0, vocab: tuple[int, int] = (2, 128)):
    """Rows of random token ids from ``vocab`` with labels (the last two positions of odd
    rows masked)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(*vocab, (length,), generator=g).tolist()
        labels = list(ids)
        if i % 2:
            labels[-2:] = [-100, -100]
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * length})
    return datasets.Dataset.from_list(rows)


def args(out: Path, **kw) -> TrainingArguments:
    """TrainingArguments: defaults, except what a small CPU test must set."""
    base = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_steps=2,
        report_to="none",
        use_cpu=True,
        seed=7,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**base, **kw})


def own_tensors(tuner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in tuner._own_parameters()}


def losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# ------------------------------------------------------------------ defaults, checkpoints


@pytest.mark.parametrize("kind", KINDS)
def test_trainer_defaults_train_and_save_only_the_tuner(kind: str, tmp_path: Path) -> None:
    tuner = make_tuner(kind)
    before = own_tensors(tuner)
    trainer = Trainer(model=tuner, args=args(tmp_path), train_dataset=dataset())
    trainer.train()
    log = losses(trainer)
    assert len(log) == 4 and all(torch.isfinite(torch.tensor(log)))
    after = own_tensors(tuner)
    assert all(not torch.equal(before[n], after[n]) for n in before), "the tuner did not train"

    for step in (2, 4):
        ckpt = tmp_path / f"checkpoint-{step}"
        saved = load_file(str(ckpt / TRAINER_WEIGHTS_NAME))
        assert set(saved) == set(before) | {STATE_META_KEY}, sorted(saved)
        n_bytes = (ckpt / TRAINER_WEIGHTS_NAME).stat().st_size
        assert n_bytes < 64_000, f"checkpoint holds {n_bytes} bytes: more than the tuner"
    # the last checkpoint is the trained tuner, loadable with .load on a fresh base model
    cls = type(tuner)
    loaded = cls.load(tmp_path / "checkpoint-4", tiny_gpt2())
    for n, t in own_tensors(loaded).items():
        assert torch.equal(t, after[n]), n
    ids = torch.tensor(dataset(2)["input_ids"])
    tuner.eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, tuner(input_ids=ids).logits)


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_trainer_loss_is_the_tuners_loss(kind: str, tmp_path: Path) -> None:
    """The loss Trainer computes for a batch is the loss of the tuned model against an
    independent reference (the prefix as cached tokens / the prompt as input embeddings)."""
    tuner = make_tuner(kind)
    trainer = Trainer(model=tuner, args=args(tmp_path), train_dataset=dataset())
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) >= {"input_ids", "labels", "attention_mask"}  # columns kept
    loss = trainer.compute_loss(tuner, dict(batch))
    base = tiny_gpt2()
    ids, labels = batch["input_ids"], batch["labels"]
    if kind == "prefix":
        ref = concat_prefix_forward(base, tuner.prefix_tensor().detach(), ids, labels=labels)
    else:
        P = tuner.num_virtual_tokens
        emb = base.get_input_embeddings()(ids)
        prompt = tuner.prompt.detach()[None].expand(len(ids), -1, -1)
        ref = base(
            inputs_embeds=torch.cat([prompt, emb], 1),
            labels=torch.cat([torch.full((len(ids), P), -100), labels], 1),
        )
    torch.testing.assert_close(loss, ref.loss, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_resume_from_checkpoint_continues_exactly(kind: str, tmp_path: Path) -> None:
    full = Trainer(
        model=make_tuner(kind), args=args(tmp_path / "a", max_steps=6, save_steps=3),
        train_dataset=dataset(),
    )  # fmt: skip
    full.train()
    want_losses, want = losses(full), own_tensors(full.model)

    # a fresh tuner with another init: everything must come from the checkpoint
    tuner = make_tuner(kind, seed=123)
    resumed = Trainer(
        model=tuner, args=args(tmp_path / "b", max_steps=6, save_steps=3), train_dataset=dataset()
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    got = losses(resumed)  # the log restored from the checkpoint, then the new steps
    assert len(got) == 6 and got[:3] == want_losses[:3]
    assert got[3:] == pytest.approx(want_losses[3:], abs=1e-6), (got, want_losses)
    for n, t in own_tensors(tuner).items():
        torch.testing.assert_close(t, want[n], atol=1e-7, rtol=0)


def test_resume_without_optimizer_state_differs(tmp_path: Path) -> None:
    """Control for the resume test: dropping optimizer.pt changes the continuation, so the
    equality above does check that the optimizer state was restored."""
    full = Trainer(
        model=make_tuner("prefix"), args=args(tmp_path / "a", max_steps=6, save_steps=3),
        train_dataset=dataset(),
    )  # fmt: skip
    full.train()
    want = own_tensors(full.model)
    (tmp_path / "a" / "checkpoint-3" / "optimizer.pt").unlink()
    tuner = make_tuner("prefix", seed=123)
    Trainer(
        model=tuner, args=args(tmp_path / "b", max_steps=6, save_steps=3), train_dataset=dataset()
    ).train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert not torch.allclose(tuner.prefix, want["prefix"], atol=1e-6)


def test_eval_strategy_and_load_best_model_at_end(tmp_path: Path) -> None:
    tuner = make_tuner("prefix")
    trainer = Trainer(
        model=tuner,
        args=args(
            tmp_path, max_steps=6, eval_strategy="steps", eval_steps=1, save_steps=1,
            load_best_model_at_end=True, learning_rate=0.05,
        ),
        # trained on the low half of the vocabulary, evaluated on the high half: the eval
        # loss rises after a while, so the best checkpoint is not the last one
        train_dataset=dataset(vocab=(2, 64)),
        eval_dataset=dataset(8, seed=1, vocab=(64, 128)),
    )  # fmt: skip
    trainer.train()
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 6
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6"), (best, evals)  # not the last
    assert trainer.state.best_metric == pytest.approx(min(evals))
    saved = load_file(str(Path(best) / TRAINER_WEIGHTS_NAME))
    assert torch.equal(tuner.prefix.detach(), saved["prefix"])  # the best was loaded back
    assert trainer.evaluate()["eval_loss"] == pytest.approx(min(evals), abs=1e-6)


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_gradient_checkpointing_trains_the_same(kind: str, tmp_path: Path) -> None:
    runs = []
    for gc in (False, True):
        tuner = make_tuner(kind)
        trainer = Trainer(
            model=tuner, args=args(tmp_path / str(gc), gradient_checkpointing=gc),
            train_dataset=dataset(),
        )  # fmt: skip
        trainer.train()
        assert tuner.is_gradient_checkpointing is gc
        runs.append((losses(trainer), own_tensors(tuner)))
    assert runs[1][0] == pytest.approx(runs[0][0], abs=1e-6)
    for n, t in runs[1][1].items():
        torch.testing.assert_close(t, runs[0][1][n], atol=1e-6, rtol=1e-5)


def test_state_dict_round_trip_and_errors() -> None:
    a, b = make_tuner("prefix"), make_tuner("prefix", seed=5)
    sd = a.state_dict()
    assert set(sd) == {"prefix", STATE_META_KEY}
    b.load_state_dict(sd)
    assert torch.equal(a.prefix, b.prefix)
    with pytest.raises(ValueError, match=r"prefixattn\.prompt_tuning"):
        b.load_state_dict(make_tuner("prompt").state_dict())
    with pytest.raises(RuntimeError, match="missing keys"):
        b.load_state_dict({})
    with pytest.raises(ValueError, match="shape"):
        b.load_state_dict({"prefix": torch.zeros(1, 2, 3)})
    full = {k: v for k, v in torch.nn.Module.state_dict(a).items()}  # old full state dict
    assert any(k.startswith("model.") for k in full)
    b.load_state_dict(full)  # still loads as nn.Module would
    assert torch.equal(a.prefix, b.prefix)


# ------------------------------------------------------------------ TRL


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_sft_trainer_defaults(kind: str, tmp_path: Path) -> None:
    trl = pytest.importorskip("trl")
    from prefixattn.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer(["colour of cat dog bird ? red green blue"])
    tuner = make_tuner(kind, model=tiny_model(len(tok), arch="gpt2"))
    base = tiny_model(len(tok), arch="gpt2")  # the same weights, no tuner
    rows = [
        {"prompt": f"colour of {a} ?", "completion": f" {c}"}
        for a in ("cat", "dog", "bird")
        for c in ("red", "green", "blue")
    ]
    cfg = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, save_steps=3,
        report_to="none", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = trl.SFTTrainer(
        model=tuner, args=cfg, train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
    )  # fmt: skip
    # the loss SFTTrainer computes (its fused LM head through tuner.base_model) is the
    # tuned model's loss on the completion tokens
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(tuner, dict(batch))
    labels = batch.get("labels")
    assert labels is not None and (labels == -100).any() and (labels != -100).any()
    ref = tuner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                labels=labels).loss  # fmt: skip
    torch.testing.assert_close(loss, ref, atol=2e-5, rtol=1e-5)
    untuned = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   labels=labels).loss  # fmt: skip
    assert abs(untuned.item() - ref.item()) > 1e-4  # the tuner is applied
    trainer.train()
    loaded = type(tuner).load(tmp_path / "checkpoint-3", tiny_model(len(tok), arch="gpt2"))
    for n, t in own_tensors(loaded).items():
        assert torch.equal(t, own_tensors(tuner)[n])


# ------------------------------------------------------------------ torchrun


def test_torchrun_two_processes_train_the_one_process_tuner(tmp_path: Path) -> None:
    """Two gloo CPU processes with 2 rows each give the prefix of one process with 4."""
    script = ROOT / "tests" / "trainer_ddp_run.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])

    def run(cmd: list[str], out: Path) -> dict:
        proc = subprocess.run(
            [*cmd, str(out)], capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return json.loads((out / "result.json").read_text())

    one = run([sys.executable, str(script), "--per-device", "4"], tmp_path / "one")
    two = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(script), "--per-device", "2"],
        tmp_path / "two",
    )  # fmt: skip
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    a = PrefixTuning.load(tmp_path / "one" / "final", tiny_gpt2()).prefix
    b = PrefixTuning.load(tmp_path / "two" / "final", tiny_gpt2()).prefix
    err = (a - b).abs().max().item()
    assert err < 1e-6, f"2-process prefix differs from the 1-process prefix by {err:.2e}"
    assert not torch.equal(a, make_tuner("prefix").prefix)  # it trained


# ------------------------------------------------------------------ multi-task


def test_trainer_trains_the_multitask_tuner_from_a_task_ids_column(tmp_path: Path) -> None:
    from prefixattn import MultiTaskPrefixTuning

    ds = dataset().map(lambda row, i: {"task_ids": i % 3}, with_indices=True)
    torch.manual_seed(0)
    mt = MultiTaskPrefixTuning(tiny_gpt2(), {"a": 2, "b": 5, "c": 1}, backend="sdpa")
    before = mt.bank.detach().clone()
    trainer = Trainer(model=mt, args=args(tmp_path), train_dataset=ds)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "task_ids" in batch  # the column reaches forward
    trainer.train()
    for t, P in enumerate((2, 5, 1)):  # every task trained, only its own positions
        assert not torch.equal(mt.bank[:, :, t, :, :P], before[:, :, t, :, :P])
        assert torch.count_nonzero(mt.bank[:, :, t, :, P:]) == 0
    loaded = MultiTaskPrefixTuning.load(tmp_path / "checkpoint-4", tiny_gpt2())
    assert torch.equal(loaded.bank, mt.bank.detach())
    mt.save(tmp_path / "tasks")
    assert PrefixTuning.load(tmp_path / "tasks" / "b", tiny_gpt2()).num_virtual_tokens == 5
