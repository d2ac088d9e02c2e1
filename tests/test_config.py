"""Config dataclasses: validation, per-layer widths, HF round trips, parameter counts."""

from __future__ import annotations

import jax
import pytest

from conftest import tiny_config
from loraprune_jax.config import LlamaConfig, PruneConfig, RunConfig, default_dtype
from loraprune_jax.models.llama_params import init_base


def test_hf_round_trip_uniform_and_ragged():
    cfg = tiny_config("gqa", tied=False)
    assert LlamaConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    ragged = cfg.with_widths((6, 3, 0), (2, 1, 0), (40, 17, 3))
    d = ragged.to_hf_dict()
    assert d["layer_num_heads"] == [6, 3, 0]
    back = LlamaConfig.from_hf_dict(d)
    assert back == ragged and not back.is_uniform
    assert [back.heads(i) for i in range(3)] == [6, 3, 0]
    assert LlamaConfig.from_json(ragged.to_json()) == ragged
    # widths that agree collapse back to a uniform config
    same = cfg.with_widths((6,) * 3, (2,) * 3, (40,) * 3)
    assert same == cfg and same.is_uniform


def test_num_params_counts_the_tree():
    for tied in (True, False):
        cfg = tiny_config("gqa", tied=tied).with_widths((6, 3, 6), (2, 1, 2), (40, 11, 40))
        base = init_base(cfg, 0)
        assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(base))


def test_validation_errors():
    with pytest.raises(ValueError, match="multiple"):
        tiny_config("gqa", num_kv_heads=4)
    with pytest.raises(ValueError, match="dtype"):
        tiny_config("gqa", dtype="int8")
    with pytest.raises(ValueError, match="entries"):
        tiny_config("gqa", layer_num_heads=(6, 6))
    with pytest.raises(ValueError, match="not a LLaMA"):
        LlamaConfig.from_hf_dict({"model_type": "gpt2"})
    with pytest.raises(NotImplementedError, match="rope scaling"):
        LlamaConfig.from_hf_dict({**tiny_config().to_hf_dict(), "rope_scaling": {"rope_type": "yarn"}})


def test_hf_defaults():
    d = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 4, "num_hidden_layers": 1,
         "num_attention_heads": 2, "model_type": "llama"}
    cfg = LlamaConfig.from_hf_dict(d)
    assert cfg.num_kv_heads == 2 and cfg.head_dim == 4 and cfg.rope_theta == 10000.0
    assert cfg.rms_norm_eps == 1e-6  # HF LlamaConfig default


def test_run_config_round_trip_and_overrides():
    from loraprune_jax.config import RunConfig

    cfg = RunConfig().override({"prune.ratio": 0.2, "train.steps": 5, "lora.targets": ["q", "v"],
                                "eval_max_windows": None, "lora.alpha": 32})
    assert cfg.prune.ratio == 0.2 and cfg.train.steps == 5 and cfg.lora.targets == ("q", "v")
    assert cfg.eval_max_windows is None and cfg.lora.alpha == 32.0 and cfg.lora.scale == 4.0
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    for bad, msg in [({"prune.ratio": 1.0}, "ratio"), ({"prune.criterion": "x"}, "criterion"),
                     ({"foo": 1}, "unknown config key"), ({"train.steps": "a"}, "expects int"),
                     ({"prune.exclude_last": 3}, "true or false"), ({"train.seq_len": 1}, "seq_len")]:
        with pytest.raises(ValueError, match=msg):
            RunConfig().override(bad)


def test_granularity_and_nm_pattern():
    from loraprune_jax.config import PruneConfig, RunConfig, parse_nm

    assert PruneConfig().granularity == "structured" and not PruneConfig().element_wise
    assert parse_nm("2:4") == (2, 4) and parse_nm(" 1:8 ") == (1, 8)
    for bad in ("2-4", "2:4:8", "a:4", "4:4", "0:4", "5:4", 124):
        with pytest.raises(ValueError, match="prune.nm"):
            parse_nm(bad)
    with pytest.raises(ValueError, match="unknown granularity 'blocks'"):
        PruneConfig(granularity="blocks")
    # with nm the ratio follows the pattern unless given; a different explicit one is an error
    cfg = RunConfig().override({"prune.granularity": "nm", "prune.nm": "1:4"})
    assert cfg.prune.ratio == 0.75 and cfg.prune.nm_pattern == (1, 4) and cfg.prune.element_wise
    assert RunConfig().override({"prune.granularity": "nm"}).prune.ratio == 0.5
    assert cfg.override({"prune.nm": "3:8"}).prune.ratio == 0.625
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    same = RunConfig().override({"prune.granularity": "nm", "prune.nm": "1:4", "prune.ratio": 0.75})
    assert same == cfg
    with pytest.raises(ValueError, match=r"prunes 1 - 1/4 = 0.75 of every matrix, but prune.ratio=0.5"):
        RunConfig().override({"prune.granularity": "nm", "prune.nm": "1:4", "prune.ratio": 0.5})
    with pytest.raises(ValueError, match="prune.allocation must be uniform"):
        RunConfig().override({"prune.granularity": "nm", "prune.allocation": "global"})
    with pytest.raises(ValueError, match="prune.nm"):
        RunConfig().override({"prune.granularity": "nm", "prune.nm": "4:2"})
    # unstructured keeps the ratio and allows global allocation
    un = RunConfig().override({"prune.granularity": "unstructured", "prune.ratio": 0.3,
                               "prune.allocation": "global"})
    assert un.prune.ratio == 0.3 and un.prune.element_wise


def test_moving_average_defaults_per_criterion():
    assert PruneConfig().ema_beta is None and PruneConfig().beta == 0.9  # the paper's
    for criterion in ("fisher", "taylor"):
        assert PruneConfig(criterion=criterion).beta == 0.99
    assert PruneConfig(criterion="fisher", ema_beta=0.5).beta == 0.5
    assert RunConfig().override({"prune.ema_beta": 0.95}).prune.beta == 0.95
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"prune.ema_beta must be a number in \[0, 1\) or null"):
            RunConfig().override({"prune.ema_beta": bad})
    for bad in ("x", True):  # refused by the field's type (float or null) first
        with pytest.raises(ValueError, match="prune.ema_beta expects float"):
            RunConfig().override({"prune.ema_beta": bad})
    again = RunConfig.from_dict(RunConfig().override({"prune.criterion": "fisher"}).to_dict())
    assert again.prune.ema_beta is None and again.prune.beta == 0.99


def test_default_dtype_follows_the_backend():
    expected = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    assert default_dtype() == expected
    assert RunConfig().dtype is None  # a run without dtype= takes default_dtype() when it loads
