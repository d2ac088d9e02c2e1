"""Config input (loraprune_jax.config.parse): every bad ``key=value`` argument or YAML config file
is one ConfigError line naming the key or the file, and random input gives a config or that error,
never anything else."""

from __future__ import annotations

import functools
import json
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraprune_jax.cli import main
from loraprune_jax.config import (
    ClassifierConfig,
    ConfigError,
    PruneConfig,
    RunConfig,
    build_run_config,
    flatten,
    parse_overrides,
)
from loraprune_jax.config.fields import known_keys

# (overrides, config file bytes or None, fragments of the message; {file} is the file's path)
CASES = {
    # YAML that does not parse, in a file (with line and column) and after key=
    "file tab indent": ([], b"prune:\n\tratio: 0.2\n", ["{file}: line 2, column 1: found character '\\t'",
                                                       "indented with spaces"]),
    "file unclosed [": ([], b"lora: {targets: [q, v}\n", ["{file}: line 1, column 22", "flow sequence"]),
    "file value @": ([], b"out: @x\n", ["{file}: line 1, column 6: found character '@'"]),
    "file value `": ([], b"out: `x\n", ["{file}: line 1, column 6: found character '`'"]),
    "file unclosed quote": ([], b"out: 'x\n", ["{file}: line 2", "quoted scalar"]),
    "file two documents": ([], b"out: a\n---\nout: b\n", ["{file}: line 2, column 1: expected a single document"]),
    "file control char": ([], b"out: a\x01b\n", ["{file}: line 1, column 7: character '\\x01' is not allowed"]),
    "file python tag": ([], b"out: !!python/name:os.system\n", ["{file}: line 1, column 6: could not determine"]),
    "override unclosed [": (["lora.targets=[q, v"], None, ["lora.targets='[q, v' is not a YAML value",
                                                          "line 1, column 6", "a list [a, b]"]),
    "override tab": (["lora.targets=[q,\n\tv"], None, ["lora.targets=", "'\\t'"]),
    "override @": (["prune.criterion=@x"], None, ["prune.criterion='@x' is not a YAML value",
                                                 "quote text that starts with @"]),
    "override `": (["out=`x"], None, ["out='`x' is not a YAML value", "found character '`'"]),
    "override unclosed quote": (["out='x"], None, ["out=\"'x\" is not a YAML value", "quoted scalar"]),
    "override bad date": (["out=2024-13-45"], None, ["out='2024-13-45' is not a YAML value", "month"]),
    # a section set to a value
    "section = scalar": (["prune=0.5"], None, ["prune is a section; set its keys, e.g. prune.ratio=0.5"]),
    "section: scalar in a file": ([], b"prune: 0.5\n", ["prune is a section; set its keys, e.g. prune.ratio=0.5"]),
    "section = list": (["train=[1]"], None, ["train is a section; set its keys, e.g. train.steps=200"]),
    "section = text": (["lora=q"], None, ["lora is a section", "lora.rank=8"]),
    # not key=value, unknown keys
    "no =": (["prune.ratio"], None, ["expected key=value such as prune.ratio=0.2, got 'prune.ratio'"]),
    "no key": (["=0.5"], None, ["expected key=value", "'=0.5'"]),
    "unknown key": (["prune.rate=0.1"], None, ["unknown config key 'prune.rate'", "known: model,", "prune.ratio"]),
    "unknown key in a file": ([], b"prune:\n  rate: 0.1\n", ["unknown config key 'prune.rate'; known:"]),
    "key under a value": (["model.x=1"], None, ["unknown config key 'model.x' (model takes a value"]),
    "key with a newline": (["pru\nne=1"], None, ["unknown config key 'pru\\nne'"]),
    "classifier key": (["model=vit-s", "lora.rank=4"], None, ["unknown config key 'lora.rank'", "lora_rank"]),
    "file key not text": ([], b"1: 2\n", ["{file}: key 1 is not a name", "prune.ratio"]),
    "file null key": ([], b"prune:\n  null: 2\n", ["{file}: key None under prune is not a name"]),
    # found by the property test: a section named by a control character, quoted on one line
    "file odd section": ([], b'"\\r":\n  0: null\n', ["{file}: key 0 under '\\r' is not a name"]),
    "file key twice": ([], b"prune:\n  ratio: 0.2\nprune:\n  criterion: wanda\n",
                       ["{file}: line 3, column 1: key 'prune' is given twice; give each key once"]),
    "file alias loop": ([], b"prune: &x {ratio: *x}\n", ["prune.ratio expects float (a number), got {"]),
    # wrong types and values, each naming its key
    "text for int": (["train.steps=abc"], None, ["train.steps expects int (a whole number), got 'abc'"]),
    "int for bool": (["prune.exclude_last=3"], None, ["prune.exclude_last must be true or false, got 3"]),
    "null for int": (["train.steps=null"], None, ["train.steps cannot be null; give a whole number"]),
    "list for text": (["dtype=[1]"], None, ["dtype expects str (text), got [1]"]),
    "nested list": (["lora.targets=[[q]]"], None, ["lora.targets expects a list of text such as [a, b]"]),
    "huge int for float": (["lora.alpha=" + "9" * 400], None, ["lora.alpha is too large a number"]),
    "deep nesting": (["lora.targets=" + "[" * 600 + "]" * 600], None, ["(nested too deeply)"]),
    "ratio out of range": (["prune.ratio=1.5"], None, ["prune.ratio must be in [0, 1), got 1.5"]),
    "unknown granularity": (["prune.granularity=blocks"], None, ["prune.granularity: unknown granularity 'blocks'"]),
    "bad LoRA target": (["lora.targets=[q, lm_head]"], None, ["lora.targets: unknown LoRA targets ['lm_head']"]),
    "classifier data": (["model=vit-s", "data=imagenet"], None, ["data: unknown classifier data 'imagenet'"]),
    # non-finite numbers are refused by the range checks
    "ratio nan": (["prune.ratio=.nan"], None, ["prune.ratio must be in [0, 1), got nan"]),
    "lr inf": (["train.lr=.inf"], None, ["train.lr must be a finite number > 0, got inf"]),
    "lr -inf": (["train.lr=-.inf"], None, ["train.lr must be a finite number > 0, got -inf"]),
    "clip nan": (["train.clip_norm=.nan"], None, ["train.clip_norm must be a finite number > 0"]),
    "alpha nan": (["lora.alpha=.nan"], None, ["lora.alpha must be a finite number, got nan"]),
    "warmup nan": (["prune.warmup=.nan"], None, ["prune.warmup must be in [0, 1), got nan"]),
    "classifier alpha inf": (["model=vit-s", "lora_alpha=.inf"], None, ["lora_alpha must be a finite number"]),
    # empty text sources would mean the working directory
    "data empty": (["data="], None, ["data is empty; give a text source: wiki,", "tfds:NAME[:SPLIT]"]),
    "data empty in a file": ([], b"data: ''\n", ["data is empty"]),
    "model empty": (["model="], None, ["model is empty; give smollm2"]),
    "eval text empty": (["eval_texts=[lee, '']"], None, ["eval_texts has an empty entry", "[] for none"]),
    # the file itself
    "file not UTF-8": ([], b"out: caf\xe9\n", ["{file}: not UTF-8 text (byte 0xe9 at offset 8)", "UTF-8"]),
    "file UTF-16": ([], "out: x\n".encode("utf-16"), ["{file}: not UTF-8 text (byte 0xff at offset 0)"]),
    "file a list": ([], b"- a\n- b\n", ["{file}: expected a mapping of config keys", "['a', 'b']"]),
    "file a scalar": ([], b"hello\n", ["{file}: expected a mapping of config keys", "'hello'"]),
}


def _expect_config_error(tmp_path, overrides, content):
    path = None
    if content is not None:
        path = tmp_path / "run.yaml"
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        build_run_config(str(path) if path else None, overrides)
    return str(info.value), str(path)


@pytest.mark.parametrize("overrides, content, fragments", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_config_error_line(tmp_path, overrides, content, fragments):
    message, path = _expect_config_error(tmp_path, overrides, content)
    assert len(message.splitlines()) == 1 and "\n" not in message, message
    for fragment in fragments:
        assert fragment.replace("{file}", path) in message, message


def test_missing_file_and_directory_are_named(tmp_path):
    for path, what in [(tmp_path / "nope.yaml", "no such config file"), (tmp_path, "a directory")]:
        with pytest.raises(ConfigError, match="YAML file") as info:
            build_run_config(str(path), [])
        assert str(info.value).startswith(f"{path}: {what}")


def test_dataclass_checks_are_config_errors_naming_their_key():
    """Built directly (not through key=value) the dataclasses raise the same ConfigError, which
    callers catching ValueError still catch."""
    with pytest.raises(ConfigError, match=r"^prune.ratio must be in \[0, 1\), got 1.5$"):
        PruneConfig(ratio=1.5)
    with pytest.raises(ValueError, match="prune.init_ratio must be in"):
        PruneConfig(init_ratio=0.9)
    with pytest.raises(ConfigError, match="^train.warmup_steps must be in"):
        RunConfig().override({"train.warmup_steps": 200})
    with pytest.raises(ConfigError, match="^prune.prune_every must be at least 1"):
        RunConfig().override({"prune.prune_every": 0})
    with pytest.raises(ConfigError, match="^lora.rank"):
        RunConfig().override({"lora.rank": 0})


def test_what_is_accepted(tmp_path):
    """An empty or comment-only file sets nothing; ``prune:`` with nothing under it and
    ``prune={...}`` set keys of a section; merge keys may be overridden; a BOM is fine."""
    path = tmp_path / "run.yaml"
    for text in ("", "# nothing yet\n", "prune:\ntrain:\n"):
        path.write_text(text)
        assert build_run_config(str(path), ["out=x"]) == RunConfig(out="x")
    path.write_text("\ufeffbase: &b {ratio: 0.2, criterion: wanda}\n")
    with pytest.raises(ConfigError, match="unknown config key 'base.ratio'"):
        build_run_config(str(path), [])
    path.write_text("prune:\n  <<: {ratio: 0.2, criterion: wanda}\n  ratio: 0.3\n")
    cfg = build_run_config(str(path), ["train={steps: 7}", "out=x"])
    assert (cfg.prune.ratio, cfg.prune.criterion, cfg.train.steps) == (0.3, "wanda", 7)
    cls = build_run_config(None, ["model=vit-s", "prune={ratio: 0.3}", "data="])  # its own data
    assert isinstance(cls, ClassifierConfig) and cls.prune.prune_every == 5 and cls.data == ""
    assert parse_overrides(["out=", "prune.nm=2:4", "eval_max_windows=null"]) == {
        "out": "", "prune.nm": "2:4", "eval_max_windows": None}


def test_cli_reports_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune:\n\tratio: 0.2\n")
    for argv, fragment in [(["prune", "prune=0.5"], "error: prune is a section"),
                           (["prune", "--config", str(bad)], f"error: {bad}: line 2, column 1"),
                           (["prune", "prune.criterion=@x"], "error: prune.criterion='@x'")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(fragment) and err.count("\n") == 1, err


# -- property: random input gives a config or a ConfigError --------------------------------------

KEYS = sorted({*known_keys(RunConfig()), *known_keys(ClassifierConfig()), "prune", "train", "lora"})
PUNCTUATION = "[]{},:#&*!|>'\"%@`-?.=~ \t\n\\"
junk = st.text(alphabet=string.ascii_letters[:6] + string.digits[:3] + PUNCTUATION + "é\x00\x85\u2028",
               max_size=12)
# values that trip YAML or the checks: loaders' own errors, tags, aliases, non-finite numbers
traps = st.sampled_from([
    ".nan", ".inf", "-.inf", "1.0e400", "9" * 400, "2024-13-45", "!!int abc", "!!binary x",
    "!!set {a}", "!!python/name:os.system", "&a [*a]", "[" * 40, "'", "\"\\x\"", "@x", "`x", "\t1",
    "{ratio: 0.2}", "{1: 2}", "[[q]]", "null", "~", "", "[" * 600 + "]" * 600,
])
interesting = st.sampled_from([
    "2:4", "1:4", "[q, v]", "{}", "[]", "vit-s", "cifar10-cnn", "nm", "unstructured", "fisher",
    "global", "int8", "bfloat16", "yes", "0x1F", "1_000", "2024-01-01", "-1", "0", "0.5", "0.75",
    "true", "'@x'",
])
numbers = st.one_of(st.integers(-3, 300).map(str), st.floats(-0.5, 1.5).map(str))
keys = st.one_of(st.sampled_from(KEYS), junk, st.builds("{}.{}".format, st.sampled_from(KEYS), junk))
values = st.one_of(traps, interesting, numbers, junk)
override = st.one_of(st.builds("{}={}".format, keys, values), junk)
# known keys with plausible values (their defaults among them), so that runs also get past the
# parser into the checks and are accepted now and then
DEFAULTS = {k: json.dumps(v) for cfg in (RunConfig(), ClassifierConfig())
            for k, v in flatten(cfg.to_dict()).items() if k != "model"}
plausible = st.one_of(
    st.sampled_from(sorted(DEFAULTS)).flatmap(lambda key: st.builds(
        "{}={}".format, st.just(key), st.one_of(st.just(DEFAULTS[key]), traps, interesting, numbers))),
    st.builds("{}={}".format, st.sampled_from(["prune", "train", "lora"]), st.one_of(traps, interesting)))
overrides = st.one_of(st.lists(plausible, max_size=4), st.lists(override, max_size=4),
                      st.builds(list.__add__, st.lists(plausible, max_size=2),
                                st.lists(st.sampled_from(["model=vit-s", "model=cifar10-cnn"]), max_size=1)))

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.floats(0, 1),
                    st.text(max_size=8), st.sampled_from(["2:4", "vit-s", "nm", "wiki", "lee", ""]))
dict_keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=6), st.integers(),
                      st.none(), st.booleans())
trees = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(dict_keys, inner, max_size=4), max_leaves=12)
dump = functools.partial(yaml.safe_dump, sort_keys=False)  # keys of mixed types do not sort
yaml_text = st.one_of(
    st.builds(dump, st.dictionaries(st.sampled_from(KEYS), scalars, max_size=6)),
    st.builds(dump, st.dictionaries(dict_keys, trees, max_size=6)),
    st.builds(dump, trees),
    st.lists(st.builds("{}: {}".format, keys, values), max_size=5).map("\n".join),
    st.text(alphabet=string.ascii_letters[:4] + PUNCTUATION, max_size=40),
)
file_bytes = st.one_of(st.none(), st.none(), yaml_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
                       st.binary(max_size=30))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=file_bytes, overrides=overrides)
def test_random_input_gives_a_config_or_a_config_error(tmp_path_factory, content, overrides):
    path = None
    if content is not None:
        path = tmp_path_factory.getbasetemp() / "random.yaml"
        path.write_bytes(content)
    try:
        cfg = build_run_config(str(path) if path else None, overrides)
    except ConfigError as e:
        assert len(str(e).splitlines()) == 1, str(e)
        return
    assert isinstance(cfg, (RunConfig, ClassifierConfig))
    # what is accepted survives the JSON next to every checkpoint (--resume reads it back)
    assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
