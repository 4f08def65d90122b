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


for name, make in (
    ("train fwd+bwd B8 H12 N1024 P64", case_train),
    ("decode bank8 B64 P512", case_decode),
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
    print(f"\n=== {name}: {wall:.3f} ms per call (host wall, pipelined)")
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
