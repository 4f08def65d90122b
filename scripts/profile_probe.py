"""Where the time goes: CUDA kernel time vs host time per call, for a training-shaped
fwd+bwd and a mixed-task decode step.

    PYTHONPATH=. python scripts/profile_probe.py
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

import prefixattn

dev, dt = "cuda", torch.bfloat16


def case_train():
    g = torch.Generator(device=dev).manual_seed(0)
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dt, generator=g).requires_grad_()  # noqa: E731
    q, k, v = mk(8, 12, 1024, 64), mk(8, 12, 1024, 64), mk(8, 12, 1024, 64)
    pk, pv = mk(12, 64, 64), mk(12, 64, 64)
    gout = torch.ones(8, 12, 1024, 64, device=dev, dtype=dt)

    def step():
        o = prefixattn.prefix_attention(q, k, v, pk, pv, backend="triton")
        torch.autograd.grad(o, [q, k, v, pk, pv], gout)

    return step


def case_decode():
    g = torch.Generator(device=dev).manual_seed(0)
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dt, generator=g)  # noqa: E731
    q, k, v = mk(64, 12, 1, 64), mk(64, 12, 512, 64), mk(64, 12, 512, 64)
    pk, pv = mk(8, 12, 512, 64), mk(8, 12, 512, 64)
    idx = torch.arange(64, device=dev) % 8

    def step():
        with torch.no_grad():
            prefixattn.prefix_attention(q, k, v, pk, pv, prefix_index=idx, backend="triton")

    return step


def case_e2e():
    """One GPT-2 small prefix-tuning train step (random bf16 weights), as the e2e benchmark:
    is the step bound by the GPU or by the host?"""
    import transformers

    cfg = transformers.GPT2Config(n_positions=2048, attn_pdrop=0.0, resid_pdrop=0.0,
                                  embd_pdrop=0.0)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(dev):
        model = transformers.GPT2LMHeadModel(cfg).to(dt)
    model.train()
    pt = prefixattn.PrefixTuning(model, num_virtual_tokens=64, backend="triton")
    opt = torch.optim.AdamW([p for p in pt.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (8, 1024), device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        pt(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    return step


for name, make in (
    ("train fwd+bwd B8 H12 N1024 P64", case_train),
    ("decode bank8 B64 P512", case_decode),
    ("gpt2-small prefix-tuning train step B8 N1024 P64", case_e2e),
):
    step = make()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(50):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / 50 * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    gpu_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 10 / 1e3
    print(f"\n=== {name}: {wall:.3f} ms per call (host wall, pipelined), "
          f"{gpu_ms:.3f} ms of GPU kernel time per call")  # fmt: skip
    print(
        prof.key_averages().table(
            sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50
        )
    )

# Python hot spots of the host side of one training step (the GPU work is ~0.3 ms).
import cProfile  # noqa: E402
import pstats  # noqa: E402

step = case_train()
step()
torch.cuda.synchronize()
prof = cProfile.Profile()
prof.enable()
for _ in range(20):
    step()
torch.cuda.synchronize()
prof.disable()
print("\n=== cProfile, 20 train steps (tottime)")
pstats.Stats(prof).sort_stats("tottime").print_stats(22)
