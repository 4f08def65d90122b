"""Input builders and comparison helpers shared by the kernel tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from reference64 import attention64, rel_err

# Relative-norm tolerances (||out - ref|| / ||ref||) per dtype: (output, gradients).
# fp32 runs with true fp32 products; fp16/bf16 round P and dS to the input dtype before
# the second matmul of each pair, as every flash-attention kernel does.
TOL = {
    torch.float32: (2e-5, 5e-5),
    torch.float16: (3e-3, 1e-2),
    torch.bfloat16: (2e-2, 5e-2),
    torch.float64: (1e-10, 1e-10),
}


@dataclass
class Case:
    B: int = 2
    H: int = 2
    Hkv: int = 2
    Nq: int = 17
    Nk: int = 17
    P: int = 7
    D: int = 32
    prefix: str = "shared"  # none | shared | row | bank
    pad: str = "none"  # none | left | right | random
    causal: bool = True
    T: int = 3  # bank size

    def id(self) -> str:
        return (
            f"B{self.B}-H{self.H}x{self.Hkv}-q{self.Nq}-k{self.Nk}-P{self.P}-D{self.D}"
            f"-{self.prefix}-{self.pad}{'' if self.causal else '-full'}"
        )


def padding_mask(B: int, Nk: int, kind: str, gen: torch.Generator) -> torch.Tensor | None:
    """bool [B, Nk], True = real token; rows get different amounts of padding."""
    if kind == "none":
        return None
    mask = torch.ones(B, Nk, dtype=torch.bool)
    for b in range(B):
        n_pad = (b * 5 + 3) % max(Nk, 1) if Nk else 0
        if kind == "left":
            mask[b, :n_pad] = False
        elif kind == "right":
            mask[b, Nk - n_pad :] = False
        elif kind == "random":
            mask[b] = torch.rand(Nk, generator=gen) > 0.35
        else:
            raise ValueError(kind)
    if B > 1 and Nk > 0 and kind != "random":
        mask[-1, :] = False  # one row with every sequence key padded
    return mask


def make_inputs(
    c: Case,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
    noncontiguous: bool = False,
) -> dict:
    """Random inputs for a case (leaf tensors requiring grad), as prefix_attention kwargs."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    if noncontiguous:
        # HF layout [B, N, H, D] viewed as [B, H, N, D]; prefix as a strided slice
        q = rnd(c.B, c.Nq, c.H, c.D).to(device, dtype).transpose(1, 2)
        k = rnd(c.B, c.Nk, c.Hkv, c.D).to(device, dtype).transpose(1, 2)
        v = rnd(c.B, c.Nk, c.Hkv, 2 * c.D).to(device, dtype)[..., ::2].transpose(1, 2)
    else:
        q = rnd(c.B, c.H, c.Nq, c.D).to(device, dtype)
        k = rnd(c.B, c.Hkv, c.Nk, c.D).to(device, dtype)
        v = rnd(c.B, c.Hkv, c.Nk, c.D).to(device, dtype)
    kw: dict = {"q": q, "k": k, "v": v}
    if c.prefix != "none":
        lead = {"shared": (), "row": (c.B,), "bank": (c.T,)}[c.prefix]
        if noncontiguous:
            pk = rnd(*lead, c.P, c.Hkv, c.D).to(device, dtype).transpose(-3, -2)
            pv = rnd(*lead, c.Hkv, c.P, 3 * c.D).to(device, dtype)[..., 1::3]
        else:
            pk = rnd(*lead, c.Hkv, c.P, c.D).to(device, dtype)
            pv = rnd(*lead, c.Hkv, c.P, c.D).to(device, dtype)
        kw["prefix_k"], kw["prefix_v"] = pk, pv
        if c.prefix == "bank":
            # repeated indices, and (when T > B) entries no row uses
            idx = torch.tensor([(2 * b) % c.T for b in range(c.B)], dtype=torch.int64)
            kw["prefix_index"] = idx.to(device)
    kpm = padding_mask(c.B, c.Nk, c.pad, gen)
    if kpm is not None:
        kw["key_padding_mask"] = kpm.to(device)
    kw["causal"] = c.causal
    for name in ("q", "k", "v", "prefix_k", "prefix_v"):
        if name in kw:
            kw[name].requires_grad_(True)
    return kw


DIFF_NAMES = ("q", "k", "v", "prefix_k", "prefix_v")


def run_with_grads(fn, kw: dict, grad_out: torch.Tensor | None = None, seed: int = 1):
    """out, grad_out and {name: grad} for every differentiable input of kw."""
    out = fn(**kw)
    if grad_out is None:
        gen = torch.Generator().manual_seed(seed)
        grad_out = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    names = [n for n in DIFF_NAMES if n in kw]
    leaves = [kw[n] for n in names]
    # an input the function does not use (the float64 reference skips an empty P = 0
    # prefix) has a zero gradient
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    return out, grad_out, dict(zip(names, grads))


def check_against_float64(fn, kw: dict, dtype: torch.dtype) -> None:
    """fn's output and all gradients vs the float64 concat reference (same inputs)."""
    out, g, grads = run_with_grads(fn, kw)
    ref_kw = {
        n: (t.detach().double().requires_grad_(True) if n in DIFF_NAMES else t)
        for n, t in kw.items()
    }
    _, _, ref_grads = run_with_grads(attention64, ref_kw, grad_out=g.double())
    ref_out = attention64(**ref_kw).detach()
    tol_o, tol_g = TOL[dtype]
    assert out.dtype == kw["q"].dtype and out.shape == kw["q"].shape
    assert torch.isfinite(out).all()
    err = rel_err(out, ref_out)
    assert err < tol_o, f"output: rel err {err:.2e} >= {tol_o:.0e}"
    for n, gr in grads.items():
        ref = ref_grads[n]
        assert gr.shape == kw[n].shape, f"d{n} shape {tuple(gr.shape)}"
        assert torch.isfinite(gr).all(), f"d{n} not finite"
        if ref.numel() == 0 or ref.abs().max() == 0:
            # the exact gradient is 0 (e.g. one visible key: dS = P (dO.v - dO.O) = 0);
            # the kernel may leave rounding residue of the size of its tolerance
            assert gr.numel() == 0 or gr.abs().max() <= tol_g, f"d{n} should be ~0"
            continue
        e = rel_err(gr, ref)
        assert e < tol_g, f"d{n}: rel err {e:.2e} >= {tol_g:.0e}"


def run_compiled_triton_script(script: str, **env_vars: str) -> object:
    """Run ``python -c script`` from the repository root in a process where Triton
    compiles for the GPU (``TRITON_INTERPRET`` removed): this process may already hold the
    interpreted kernels. Asserts a zero exit; returns the last stdout line parsed as JSON."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    env.update(env_vars)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pool_attention64(**kw) -> torch.Tensor:
    """float64 attention over a KV-cache pool (``cache_seqlens`` / ``cache_batch_idx``, the
    pool ``k``, ``v`` [S, Hkv, Nmax, D]; or ``block_table``, the block pool [num_blocks,
    Hkv, block_size, D]): the independent reference run row by row on each row's own keys
    (``k[slot, :, :length]``, or its blocks joined one after the other with a Python loop),
    its own prefix entry cut to its length, and its key padding mask's first ``length``
    columns. Every other keyword (window, softcap, sinks, sm_scale, causal) is passed."""
    kw = dict(kw)
    csl, cbi = kw.pop("cache_seqlens", None), kw.pop("cache_batch_idx", None)
    table = kw.pop("block_table", None)
    q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
    pk, pv = kw.pop("prefix_k", None), kw.pop("prefix_v", None)
    pidx, plen = kw.pop("prefix_index", None), kw.pop("prefix_lengths", None)
    kpm = kw.pop("key_padding_mask", None)
    outs = []
    for b in range(q.shape[0]):
        if table is not None:
            n, bs = int(csl[b]), k.shape[2]
            blocks = table[b].tolist()[: -(-n // bs)]
            kb = torch.cat([k[i] for i in blocks], 1)[None] if blocks else k[:1, :, :0]
            vb = torch.cat([v[i] for i in blocks], 1)[None] if blocks else v[:1, :, :0]
            row = dict(kw, q=q[b : b + 1], k=kb[:, :, :n], v=vb[:, :, :n])
        else:
            s = b if cbi is None else int(cbi[b])
            n = k.shape[2] if csl is None else int(csl[b])
            row = dict(kw, q=q[b : b + 1], k=k[s : s + 1, :, :n], v=v[s : s + 1, :, :n])
        if pk is not None and pk.dim() == 3:  # shared [Hkv, P, D]
            row.update(prefix_k=pk, prefix_v=pv)
        elif pk is not None:  # a bank entry, or row b's own prefix: [1, Hkv, P, D]
            e = int(pidx[b]) if pidx is not None else b
            row.update(prefix_k=pk[e : e + 1], prefix_v=pv[e : e + 1])
            if plen is not None:
                row["prefix_lengths"] = plen[e : e + 1]
        if kpm is not None:
            row["key_padding_mask"] = kpm[b : b + 1, :n]
        outs.append(attention64(**row))
    return torch.cat(outs)


def page_pool(kw: dict, block_size: int, seed: int = 0) -> dict:
    """The same KV-pool call over a paged cache (``block_table``): each slot of the pool
    ``k``, ``v`` [S, Hkv, Nmax, D] cut into blocks of ``block_size`` keys, the blocks
    shuffled into a block pool that also holds spare blocks of other values, row b's table
    listing its slot's blocks (rows that read one slot share its blocks) and -1 past its
    last needed block. ``cache_batch_idx`` is dropped (not taken with ``block_table``); a
    key padding mask is padded to the table's keys. Inputs are detached (inference)."""
    import torch.nn.functional as F

    out = dict(kw)
    k, v = kw["k"].detach(), kw["v"].detach()
    S, Hkv, Nmax, D = k.shape
    bs, nb = block_size, -(-Nmax // block_size)
    B = kw["q"].shape[0]
    csl = kw.get("cache_seqlens")
    if csl is None:
        csl = torch.full((B,), Nmax, dtype=torch.int32, device=k.device)
        out["cache_seqlens"] = csl
    slot = out.pop("cache_batch_idx", None)
    slot = list(range(B)) if slot is None else slot.tolist()
    g = torch.Generator().manual_seed(seed)
    n_blocks = S * nb + 3  # 3 spare blocks no row lists
    where = torch.randperm(n_blocks, generator=g)[: S * nb]  # slot block i -> pool block

    def blocks(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (0, 0, 0, nb * bs - Nmax))  # [S, Hkv, nb * bs, D]
        pool = (torch.randn(n_blocks, Hkv, bs, D, generator=g) * 3).to(t)
        # [S, Hkv, nb, bs, D] -> [S * nb, Hkv, bs, D]: slot s's block j is row s * nb + j
        paged = t.view(S, Hkv, nb, bs, D).transpose(1, 2).reshape(S * nb, Hkv, bs, D)
        return pool.index_copy_(0, where.to(t.device), paged)

    out["k"], out["v"] = blocks(k), blocks(v)
    table = [[int(where[slot[b] * nb + j]) if j < -(-int(csl[b]) // bs) else -1
              for j in range(nb)] for b in range(B)]  # fmt: skip
    out["block_table"] = torch.tensor(table, dtype=torch.int32, device=k.device)
    if kw.get("key_padding_mask") is not None:
        out["key_padding_mask"] = F.pad(kw["key_padding_mask"], (0, nb * bs - Nmax), value=True)
    return out
