"""Helper of tests/test_trainer.py (not a test): train a PrefixTuning with transformers'
Trainer, in one process or under torchrun, and write the losses and the final tuner.

Usage: python tests/trainer_ddp_run.py --per-device N OUT_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from prefixattn import PrefixTuning
from prefixattn.testing import tiny_gpt2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-device", type=int, required=True)
    ap.add_argument("out", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(1)
    import datasets

    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(16):
        n = 5 + i % 4  # ragged rows: the processes see different label-token counts
        ids = torch.randint(2, 128, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * n})
    ds = datasets.Dataset.from_list(rows)
    torch.manual_seed(0)
    tuner = PrefixTuning(tiny_gpt2(), 3, backend="sdpa", init_std=0.5)

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(r["input_ids"]) for r in batch)
        pad = [n - len(r["input_ids"]) for r in batch]  # right padding
        return {
            "input_ids": torch.tensor([r["input_ids"] + [1] * p for r, p in zip(batch, pad)]),
            "attention_mask": torch.tensor(
                [[1] * len(r["input_ids"]) + [0] * p for r, p in zip(batch, pad)]
            ),
            "labels": torch.tensor([r["labels"] + [-100] * p for r, p in zip(batch, pad)]),
        }

    args = TrainingArguments(
        output_dir=str(a.out),
        max_steps=3,
        per_device_train_batch_size=a.per_device,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=7,
        learning_rate=1e-2,
        disable_tqdm=True,
    )
    trainer = Trainer(model=tuner, args=args, train_dataset=ds, data_collator=collate)
    trainer.train()
    trainer.save_model(str(a.out / "final"))
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        result = {"world_size": trainer.args.world_size, "losses": losses}
        (a.out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
