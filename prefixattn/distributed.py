"""Multi-process training on ``torch.distributed``: DDP over the prefix, optional FSDP2 base.

``prefixattn train`` run under ``torchrun`` trains one prefix (or soft prompt) on several
processes (one per GPU with NCCL, or CPU processes with gloo). Each process holds the
frozen base model and computes its share of every global batch; only the trainable
parameters are synchronised:

* DDP (default): the tuner is wrapped in ``DistributedDataParallel`` with every frozen
  parameter and buffer of the base model in DDP's ignore list, so DDP neither broadcasts
  the base at start-up nor builds gradient buckets for it: one all-reduce of the prefix
  gradients per step.
* FSDP (``--fsdp``): the frozen base is sharded with FSDP2 (``fully_shard`` on every
  decoder layer and on the model), for bases too large for one device; the prefix stays
  replicated on every process, its gradients all-reduced (averaged) as they are
  accumulated.

The global batch (``--batch-size``) is the same as in a single process: every process
builds it (same data order, same seed) and keeps its rows (:meth:`DistributedContext.shard`).
The loss of each process is its label tokens' loss summed and divided by the global label
token count times the world size (``num_items_in_batch``), so the averaged gradient is
exactly the single-process gradient of the global batch, whatever the padding or the number
of label tokens in each shard. Rank 0 alone writes the checkpoint and prints.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistributedContext",
    "fsdp_shard_base",
    "init_distributed",
    "shard_batch",
    "wrap_ddp",
]

Batch = dict[str, Any]
DIST_BACKENDS = ("auto", "gloo", "nccl")


def _label_tokens(labels: torch.Tensor) -> int:
    """Label tokens that get a loss in a causal LM (labels are shifted by one)."""
    return int((labels[:, 1:] != -100).sum())


def shard_batch(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rows ``[rank * B // W, (rank + 1) * B // W)`` of a global batch, plus the loss scale.

    With ``labels`` in the batch, ``num_items_in_batch`` is set to the global label token
    count divided by ``world_size``: transformers' causal-LM loss then sums this shard's
    token losses and divides by it, and DDP's gradient average over the processes gives
    the gradient of the global batch's mean loss.

    Raises:
        ValueError: the batch has fewer rows than there are processes.
    """
    if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"rank/world_size: expected 0 <= rank < world_size, got {rank}/{world_size}"
        )
    B = int(batch["input_ids"].shape[0])
    if world_size > B:
        raise ValueError(
            f"batch_size: expected at least one row per process, got a global batch of {B} "
            f"rows for {world_size} processes"
        )
    lo, hi = rank * B // world_size, (rank + 1) * B // world_size
    out: Batch = {
        k: (v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B else v)
        for k, v in batch.items()
    }
    labels = batch.get("labels")
    if labels is not None:
        out["num_items_in_batch"] = max(_label_tokens(labels), 1) / world_size
    return out


def _frozen_names(module: nn.Module) -> list[str]:
    """Names of the parameters that do not train and of all buffers (DDP's ignore list)."""
    names = [n for n, p in module.named_parameters() if not p.requires_grad]
    return names + [n for n, _ in module.named_buffers()]


def wrap_ddp(tuner: nn.Module, device: torch.device | None = None) -> nn.Module:
    """``DistributedDataParallel`` over the trainable parameters of ``tuner`` only.

    The frozen base model's parameters and buffers go to DDP's ignore list: no start-up
    broadcast of the base (every process loads the same weights), no gradient buckets, no
    buffer broadcast (tuners have no buffers of their own). Call after
    ``torch.distributed.init_process_group``.

    Arguments:
        tuner: a ``PrefixTuning`` / ``PromptTuning`` (any module whose trainable
            parameters are the ones to synchronise).
        device: the process's CUDA device (``device_ids``), or None / CPU.

    Raises:
        ValueError: no process group, or nothing to train.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("wrap_ddp needs torch.distributed.init_process_group first")
    if not any(p.requires_grad for p in tuner.parameters()):
        raise ValueError("tuner: expected trainable parameters (requires_grad), found none")
    ddp_cls = nn.parallel.DistributedDataParallel
    ignore = _frozen_names(tuner)
    setter = getattr(ddp_cls, "_set_params_and_buffers_to_ignore_for_model", None)
    if setter is not None:  # torch's documented workaround (pytorch issue 43690)
        setter(tuner, ignore)
    cuda = device is not None and torch.device(device).type == "cuda"
    return ddp_cls(
        tuner,
        device_ids=[torch.device(device).index] if cuda else None,
        find_unused_parameters=False,
    )


def _fully_shard() -> Any:
    """FSDP2's ``fully_shard`` (public from torch 2.6, private module before)."""
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:  # pragma: no cover - older torch
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def fsdp_shard_base(tuner: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Shard ``tuner.model`` (frozen) with FSDP2; keep the trainable parameters replicated.

    ``fully_shard`` goes on every decoder layer (the classes in the model's
    ``_no_split_modules``) and then on the model: each process stores 1/W of the base on
    ``device`` (FSDP moves a CPU-loaded model there, layer by layer) and all-gathers a
    layer's weights just before using it (forward and backward). The prefix (or soft
    prompt) is not sharded: it stays where it is, and a gradient hook all-reduces and
    averages each of its gradients as soon as backward has accumulated it. Call after
    ``torch.distributed.init_process_group``, before training; returns ``tuner``.

    Raises:
        ValueError: no process group, or no decoder layers found to shard.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("fsdp_shard_base needs torch.distributed.init_process_group first")
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard = _fully_shard()
    model = tuner.model
    world = dist.get_world_size()
    mesh = init_device_mesh(torch.device(device).type, (world,))
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(
            f"model: found no decoder layers to shard ({type(model).__name__} lists "
            f"_no_split_modules={sorted(block_names)})"
        )
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)

    def average(p: torch.Tensor) -> None:
        dist.all_reduce(p.grad)
        p.grad.div_(world)

    for p in tuner.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(average)
    return tuner


@dataclass
class DistributedContext:
    """This process's place in a ``torchrun`` job (or a single process: ``world_size=1``).

    Use :func:`init_distributed` to build it.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # None: a single process, the caller's device
    backend: str | None = None  # "gloo" / "nccl"; None: not distributed
    _stdout: Any = field(default=None, repr=False)
    # the DDP modules prepare() made (weak): close() frees their reducers first
    _ddp: list = field(default_factory=list, repr=False)

    @property
    def is_distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints and writes files."""
        return self.rank == 0

    def device_spec(self, device: str, *, fsdp: bool = False) -> str:
        """The device this process loads the model to: ``device`` in a single process,
        else ``cuda:LOCAL_RANK`` or ``cpu``; with ``fsdp`` the CPU (:meth:`prepare` then
        keeps this process's shard of the base on its device)."""
        if self.device is None:
            return device
        return "cpu" if fsdp else str(self.device)

    def shard(self, batch: Batch) -> Batch:
        """This process's rows of a global batch (see :func:`shard_batch`)."""
        if not self.is_distributed:
            return batch
        return shard_batch(batch, self.rank, self.world_size)

    def prepare(self, tuner: nn.Module, *, fsdp: bool = False) -> nn.Module:
        """The module to train: ``tuner`` itself in a single process; else DDP over its
        trainable parameters, or (``fsdp=True``) ``tuner`` with its base sharded by FSDP2."""
        if not self.is_distributed:
            return tuner
        if fsdp:
            fsdp_shard_base(tuner, self.device)  # moves the base's shards to the device
            with torch.no_grad():
                for p in tuner.parameters():
                    if p.requires_grad:  # the replicated prefix: to this process's device
                        p.data = p.data.to(self.device)
            return tuner
        ddp = wrap_ddp(tuner, self.device)
        self._ddp.append(weakref.ref(ddp))
        return ddp

    def reduce_result(self, result: Any) -> Any:
        """A :class:`prefixattn.training.TrainResult` of the whole job: per-step losses of
        the global batch (each process's loss is its share of it, so their mean), tokens
        summed over the processes, the slowest process's time. No-op in a single process."""
        if not self.is_distributed:
            return result
        dev = self.device or torch.device("cpu")
        losses = torch.tensor(result.losses, dtype=torch.float64, device=dev)
        dist.all_reduce(losses)
        tokens = torch.tensor([result.tokens], dtype=torch.float64, device=dev)
        dist.all_reduce(tokens)
        seconds = torch.tensor([result.seconds], dtype=torch.float64, device=dev)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        result.losses = (losses / self.world_size).tolist()
        result.tokens = int(tokens.item())
        result.seconds = float(seconds.item())
        return result

    def silence_other_ranks(self) -> None:
        """Send the standard output of ranks other than 0 to nowhere (until :meth:`close`);
        errors still go to standard error."""
        if self.is_distributed and not self.is_main and self._stdout is None:
            self._stdout = sys.stdout
            sys.stdout = io.StringIO()

    def barrier(self) -> None:
        """Wait for every process (no-op in a single process)."""
        if self.is_distributed:
            dist.barrier()

    def close(self) -> None:
        """Restore standard output and destroy the process group this context created.

        The DDP modules :meth:`prepare` returned stop working here: their reducers (which
        hold the group) are freed first, as a Gloo group destroyed under a live reducer
        can hang in its destructor when the reducer goes later."""
        if self._stdout is not None:
            sys.stdout = self._stdout
            self._stdout = None
        if self._ddp:
            for ref in self._ddp:
                ddp = ref()
                if ddp is not None:
                    for name in ("logger", "reducer"):  # the logger holds the reducer too
                        if hasattr(ddp, name):
                            delattr(ddp, name)
            self._ddp.clear()
            gc.collect()
        if self.is_distributed and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def init_distributed(device: str = "auto", backend: str = "auto") -> DistributedContext:
    """Join the ``torchrun`` job this process belongs to, if any.

    Reads ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (set by ``torchrun``). With one
    process (or without ``torchrun``) nothing is initialised and the context is a no-op.

    Arguments:
        device: the CLI's ``--device``: ``auto`` (CUDA if available), ``cpu``, ``cuda``.
            Under ``torchrun`` each process uses ``cuda:LOCAL_RANK`` or the CPU.
        backend: ``auto`` (NCCL on CUDA, gloo on CPU), ``gloo`` or ``nccl``.

    Raises:
        ValueError: a bad ``backend`` / ``device``, or NCCL without CUDA.
    """
    if backend not in DIST_BACKENDS:
        raise ValueError(f"backend: expected one of {DIST_BACKENDS}, got {backend!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        use_cuda = torch.cuda.is_available()
    elif device in ("cpu", "cuda"):
        use_cuda = device == "cuda"
    else:
        raise ValueError(
            f"device: under torchrun expected 'auto', 'cpu' or 'cuda' (each process uses "
            f"cuda:LOCAL_RANK), got {device!r}"
        )
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError("device: 'cuda' requested but CUDA is not available")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise ValueError("backend: 'nccl' needs CUDA devices; use 'gloo' on CPU")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistributedContext(
        rank=rank, world_size=world, local_rank=local_rank, device=dev, backend=backend
    )
