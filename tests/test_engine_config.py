"""EngineConfig: the serving engine's options as one frozen object (Engine, create_app and
``prefixattn serve`` all build the same one; a bad value or an unknown name is an error
naming it, never dropped)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from prefixattn.cli import build_parser
from prefixattn.serve.engine.config import (
    FIELDS,
    EngineConfig,
    buckets_up_to,
    field_help,
    merge_overrides,
    with_cuda_graphs,
)

ROOT = Path(__file__).resolve().parents[1]


def test_every_field_has_a_default_and_help() -> None:
    fields = dataclasses.fields(EngineConfig)
    assert [f.name for f in fields] == list(FIELDS) and len(FIELDS) == 15
    for f in fields:
        assert f.default is not dataclasses.MISSING, f.name
        assert isinstance(f.metadata.get("help"), str) and len(f.metadata["help"]) > 20, f.name
        assert field_help(f.name) == f.metadata["help"]
    with pytest.raises(KeyError, match="nope"):
        field_help("nope")
    EngineConfig().validate()  # the defaults are valid
    with pytest.raises(dataclasses.FrozenInstanceError):
        EngineConfig().max_num_seqs = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(max_num_seqs=0), "max_num_seqs"),
        (dict(max_num_seqs=2.0), "max_num_seqs"),
        (dict(max_num_seqs=True), "max_num_seqs"),
        (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
        (dict(max_num_seqs=8, max_num_batched_tokens=4), "max_num_batched_tokens"),
        (dict(max_queue=0), "max_queue"),
        (dict(max_queue="9"), "max_queue"),
        (dict(kv_slots=0), "kv_slots"),
        (dict(max_model_len=1), "max_model_len"),
        (dict(block_size=8), "block_size"),
        (dict(block_size=24), "block_size"),
        (dict(block_size=0), "block_size"),
        (dict(num_blocks=0), "num_blocks"),
        (dict(kv_cache_memory=0), "kv_cache_memory"),
        (dict(num_blocks=4, kv_cache_memory=10**6), "not both"),
        (dict(enable_prefix_caching=1), "enable_prefix_caching"),
        (dict(seed=1.5), "seed"),
        (dict(decode_buckets=()), "decode_buckets"),
        (dict(decode_buckets=(2, 1)), "decode_buckets"),
        (dict(decode_buckets=(0, 1)), "decode_buckets"),
        (dict(decode_buckets=(1, 1)), "decode_buckets"),
        (dict(decode_buckets=(1, 2.0)), "decode_buckets"),
        (dict(compile="yes"), "compile"),
        (dict(compile_budget_s=0), "compile_budget_s"),
        (dict(compile_budget_s=-1.0), "compile_budget_s"),
        (dict(cpu_linear="mkl"), "cpu_linear"),
        (dict(keep_linear_weights="no"), "keep_linear_weights"),
    ],
)
def test_a_bad_value_raises_naming_the_field(kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        EngineConfig(**kw)
    # dataclasses.replace builds a new config: validated the same way
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(EngineConfig(), **kw)


def test_merge_overrides_and_cuda_graphs() -> None:
    base = EngineConfig(max_num_seqs=4, max_queue=9)
    assert merge_overrides(None, {}, caller="f") == EngineConfig()
    assert merge_overrides(base, {}, caller="f") is base
    got = merge_overrides(base, {"max_num_seqs": 6, "seed": 1}, caller="f")
    assert got == EngineConfig(max_num_seqs=6, max_queue=9, seed=1)
    assert base.max_num_seqs == 4  # unchanged (frozen)
    with pytest.raises(TypeError, match=r"f\(\) got unexpected keyword argument\(s\) 'max_seqs'"):
        merge_overrides(base, {"max_seqs": 6}, caller="f")
    with pytest.raises(TypeError, match="EngineConfig"):
        merge_overrides({"max_num_seqs": 2}, {}, caller="f")  # type: ignore[arg-type]
    assert EngineConfig(decode_buckets=[1, 3]).decode_buckets == (1, 3)  # a list: a tuple
    assert buckets_up_to(1) == (1,) and buckets_up_to(6) == (1, 2, 4, 6)
    assert buckets_up_to(16) == (1, 2, 4, 8, 16)
    assert with_cuda_graphs(EngineConfig(max_num_seqs=5)).decode_buckets == (1, 2, 4, 5)
    with pytest.raises(ValueError, match="decode_buckets"):
        with_cuda_graphs(EngineConfig(decode_buckets=(1, 2)))


# ------------------------------------------------------------------ Engine


@pytest.fixture(scope="module")
def bank():
    pytest.importorskip("transformers")
    from prefixattn import TaskBank
    from prefixattn.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    b = TaskBank(tiny_model(len(tok), arch="llama"))
    b.add_base("base")
    return b, tok


def test_engine_config_and_overrides_build_the_same_engine(bank) -> None:
    from prefixattn.serve.engine import Engine

    b, tok = bank
    by_config = Engine(b, tok, config=EngineConfig(max_num_seqs=3))
    by_kw = Engine(b, tok, max_num_seqs=3)
    positional = Engine(b, tok, EngineConfig(max_num_seqs=3))
    assert by_config.config == by_kw.config == positional.config
    cfg = by_kw.config
    # the defaults that depend on the model, resolved (the tiny Llama: 128 positions)
    limit = b.model.config.max_position_embeddings
    assert cfg.max_num_seqs == 3 and cfg.kv_slots == 3
    assert cfg.max_model_len == min(limit, 1024) and by_kw.max_model_len == cfg.max_model_len
    assert cfg.decode_buckets is None and cfg.max_queue == 256
    # the engine runs on them: 3 rows, a pool of kv_slots rows of max_model_len tokens
    assert by_kw.scheduler.max_num_seqs == 3 and by_kw.max_num_seqs == 3
    assert by_kw.pool.num_blocks == 3 * -(-cfg.max_model_len // 16)
    assert by_kw.graphs is None


def test_an_override_wins_over_the_config(bank) -> None:
    from prefixattn.serve.engine import Engine

    b, tok = bank
    base = EngineConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=48, seed=5)
    eng = Engine(b, tok, base, max_num_seqs=4, block_size=32, num_blocks=7)
    want = dataclasses.replace(
        base, max_num_seqs=4, block_size=32, num_blocks=7, kv_slots=4
    )  # kv_slots: resolved to max_num_seqs (num_blocks sizes the pool)
    assert eng.config == want
    assert eng.scheduler.max_num_seqs == 4 and eng.scheduler.max_num_batched_tokens == 64
    assert eng.pool.num_blocks == 7 and eng.pool.block_size == 32
    assert eng.max_blocks_per_row == 2  # cdiv(48, 32)
    # kv_cache_memory: the blocks that fit, from the model's geometry (2 layers, 2 KV heads
    # of 16 dims, float32: K and V)
    per = 2 * 2 * 2 * 16 * 16 * 4
    eng = Engine(b, tok, base, kv_cache_memory=5 * per + per - 1)
    assert eng.pool.num_blocks == 5 and eng.config.kv_cache_memory == 6 * per - 1
    # compile: decode_buckets resolved to powers of two up to max_num_seqs
    eng = Engine(b, tok, base, compile=True, max_num_seqs=6)
    assert eng.config.decode_buckets == (1, 2, 4, 6)
    # a config value the model cannot take: a ValueError naming it
    with pytest.raises(ValueError, match="kv_cache_memory"):
        Engine(b, tok, base, kv_cache_memory=per - 1)


def test_unknown_engine_option_is_a_type_error(bank) -> None:
    from prefixattn.serve.engine import Engine

    b, tok = bank
    with pytest.raises(TypeError, match=r"Engine\(\) got unexpected keyword.*'max_seq'"):
        Engine(b, tok, max_seq=4)
    with pytest.raises(TypeError, match="'cuda_graphs'"):  # a create_app keyword only
        Engine(b, tok, cuda_graphs=True)
    with pytest.raises(ValueError, match="max_num_seqs"):
        Engine(b, tok, max_num_seqs=0)


def test_max_batch_size_is_a_deprecated_alias(bank) -> None:
    from prefixattn.serve.engine import Engine

    b, tok = bank
    with pytest.warns(DeprecationWarning, match="max_num_seqs"):
        eng = Engine(b, tok, max_batch_size=5)
    assert eng.config.max_num_seqs == 5 and eng.scheduler.max_num_seqs == 5
    with pytest.warns(DeprecationWarning):
        eng = Engine(b, tok, max_batch_size=5, max_num_seqs=2)  # the new name wins
    assert eng.config.max_num_seqs == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Engine(b, tok, max_num_seqs=2)  # no warning without the old name


def test_max_queue_may_change_while_serving(bank) -> None:
    from prefixattn.serve.engine import Engine

    b, tok = bank
    eng = Engine(b, tok, max_queue=3)
    old = eng.config
    eng.max_queue = 1
    assert eng.max_queue == 1 and eng.config == dataclasses.replace(old, max_queue=1)
    with pytest.raises(ValueError, match="max_queue"):
        eng.max_queue = 0
    assert eng.max_queue == 1


def test_exported_from_the_packages() -> None:
    import prefixattn.serve as serve
    import prefixattn.serve.engine as engine

    assert serve.EngineConfig is engine.EngineConfig is EngineConfig
    assert "EngineConfig" in serve.__all__ and "EngineConfig" in engine.__all__
    with pytest.raises(AttributeError, match="nope"):
        serve.nope


# ------------------------------------------------------------------ create_app


def test_create_app_takes_a_config_and_the_old_keywords(bank) -> None:
    pytest.importorskip("fastapi")
    from prefixattn.serve import create_app
    from prefixattn.serve.openai.api_server import engine_config
    from prefixattn.tiny import tiny_model

    _, tok = bank
    model = tiny_model(len(tok), arch="gpt2")  # create_app patches it into its own bank
    app = create_app(model, tok, engine=EngineConfig(max_num_seqs=3, seed=1), max_queue=7)
    assert app.state.engine.config == resolved(model, max_num_seqs=3, seed=1, max_queue=7)
    model = tiny_model(len(tok), arch="gpt2")
    app = create_app(model, tok, max_num_seqs=5, cuda_graphs=True, cpu_linear="torch")
    cfg = app.state.engine.config
    assert cfg.decode_buckets == (1, 2, 4, 5) and cfg.cpu_linear == "torch"
    assert app.state.engine.graphs is not None  # static decode buckets (eager on the CPU)
    with pytest.raises(TypeError, match=r"create_app\(\) got unexpected keyword.*'max_seqs'"):
        create_app(model, tok, max_seqs=4)
    with pytest.raises(TypeError, match="max_batch_size"):  # the alias is Engine's only
        create_app(model, tok, max_batch_size=4)
    with pytest.raises(ValueError, match="decode_buckets"):
        create_app(model, tok, cuda_graphs=True, decode_buckets=(1, 2))
    with pytest.raises(ValueError, match="cuda_graphs"):
        engine_config(None, {}, cuda_graphs="yes")  # type: ignore[arg-type]
    assert engine_config(None, {}, cuda_graphs=False) == EngineConfig()


def resolved(model, **kw) -> EngineConfig:
    """The config an engine over ``model`` runs with (independent of Engine's code)."""
    limit = model.config.n_positions
    kw.setdefault("max_model_len", min(limit, 1024))
    kw.setdefault("kv_slots", kw.get("max_num_seqs", 16))
    return EngineConfig(**kw)


# ------------------------------------------------------------------ prefixattn serve


def _serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


@pytest.mark.parametrize(
    "argv, want",
    [
        ([], EngineConfig()),
        (
            ["--max-num-seqs", "4", "--max-num-batched-tokens", "64", "--max-queue", "9",
             "--kv-slots", "2", "--max-model-len", "100", "--block-size", "32",
             "--num-blocks", "12", "--no-prefix-caching", "--seed", "7", "--compile",
             "--compile-budget", "2.5", "--cpu-linear", "torch"],
            EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, max_queue=9, kv_slots=2,
                         max_model_len=100, block_size=32, num_blocks=12,
                         enable_prefix_caching=False, seed=7, compile=True,
                         compile_budget_s=2.5, cpu_linear="torch"),
        ),
        (["--max-batch-size", "3", "--kv-cache-memory", "4096"],
         EngineConfig(max_num_seqs=3, kv_cache_memory=4096)),
        (["--max-num-seqs", "6", "--cuda-graphs"],
         EngineConfig(max_num_seqs=6, decode_buckets=(1, 2, 4, 6))),
        (["--cpu-linear", "onednn", "--prefix-caching"], EngineConfig(cpu_linear="onednn")),
        (["--keep-linear-weights"], EngineConfig(keep_linear_weights=True)),
    ],
)  # fmt: skip
def test_cli_builds_the_config_of_the_python_call(argv: list[str], want: EngineConfig) -> None:
    from prefixattn.cli import engine_config_from_args

    assert engine_config_from_args(_serve_args(*argv)) == want


def test_cli_has_a_flag_per_field_with_the_fields_help_and_default(capsys) -> None:
    from prefixattn.cli import ENGINE_FLAGS, _engine_help, engine_config_from_args, main

    assert set(ENGINE_FLAGS) == set(FIELDS)
    args = _serve_args()
    serve = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ).choices["serve"]
    actions = {a.dest: a for a in serve._actions}
    for name in FIELDS:
        help_ = _engine_help(name)
        assert "``" not in help_, name
        if name != "decode_buckets":  # that one: --cuda-graphs (dest cuda_graphs)
            assert getattr(args, name) == getattr(EngineConfig(), name), name
            assert actions[name].help.startswith(help_), name
            assert ENGINE_FLAGS[name] in actions[name].option_strings
    # the field's ``names`` written as the flags
    assert "rows of --max-model-len tokens (default --max-num-seqs; --num-blocks" in (
        _engine_help("kv_slots")
    )
    assert field_help("kv_slots").startswith("size the paged KV cache for this many rows of ")
    with pytest.raises(SystemExit):
        _serve_args("--cpu-linear", "mkl")
    assert "invalid choice: 'mkl'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="block_size"):
        engine_config_from_args(_serve_args("--block-size", "24"))
    assert main(["serve", "--model", "tiny", "--max-model-len", "1"]) == 2  # before loading
    assert "max_model_len must be an int >= 2" in capsys.readouterr().err


def test_the_cli_parser_needs_neither_fastapi_nor_transformers() -> None:
    """The engine flags read EngineConfig (pure Python): `prefixattn --help` and the other
    subcommands work without the serve extra."""
    code = (
        "import sys; sys.modules['fastapi'] = None; sys.modules['transformers'] = None\n"
        "from prefixattn.cli import build_parser, engine_config_from_args\n"
        "a = build_parser().parse_args(['serve', '--max-num-seqs', '3'])\n"
        "print(engine_config_from_args(a).max_num_seqs)\n"
        "import prefixattn.serve as s\n"
        "try:\n    s.create_app\nexcept ImportError:\n    print('create_app needs fastapi')\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "create_app", "needs", "fastapi"]
