"""Every bad input to the command line is one line and exit 2, found before any model loads, and
leaves nothing behind: a table of cases over prune, eval, zeroshot, generate and config files,
through the real entry point (in-process)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from conftest import ZEROSHOT_DATA, byte_tokenizer, tiny_config
from loraprune_jax.cli import describe_error, main
from loraprune_jax.cli.checks import check_output_dir, check_output_file, number


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_run_inputs):
    """What the cases point at: a tiny model with and without a tokenizer, texts, bad files."""
    from loraprune_jax.io import save_hf_dir
    from loraprune_jax.models.llama_params import init_base

    root = tmp_path_factory.mktemp("bad_inputs")
    cfg = tiny_config("gqa", vocab_size=256)
    save_hf_dir(root / "notok", cfg, init_base(cfg, 0), None)
    (root / "binary.bin").write_bytes(b"\x00\x01\xff\xfe" * 64)
    (root / "latin1.yaml").write_bytes("prune:\n  criterion: caf\xe9\n".encode("latin-1"))
    (root / "tab.yaml").write_text("prune:\n\tratio: 0.5\n")
    (root / "scalar.yaml").write_text("prune: 0.5\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "unclosed.yaml").write_text("lora:\n  targets: [q, v\n")
    (root / "twice.yaml").write_text("prune:\n  ratio: 0.2\nprune:\n  criterion: lora\n")
    (root / "short.txt").write_text("Too short to train on.")
    (root / "a_file").write_text("x")
    (root / "existing_run").mkdir()
    (root / "run_bad_json").mkdir()
    (root / "run_bad_json" / "run_config.json").write_text('{"model": ')
    (root / "run_not_object").mkdir()
    (root / "run_not_object" / "run_config.json").write_text("[1, 2]")
    (root / "json_dir").mkdir()
    return {"root": root, "model": tiny_run_inputs / "model", "train": tiny_run_inputs / "train.txt",
            "eval": tiny_run_inputs / "eval.txt"}


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse exits by itself
        code = e.code
    return code, capsys.readouterr().err


PRUNE = ["prune", "--no-progress", "train.steps=2"]
M, R = "{model}", "{root}"  # placeholders filled from the fixture
EVAL = ["eval", "--model", M, "--no-progress"]
ZS = ["zeroshot", "--model", M, "--tasks", "piqa", "--data-dir", str(ZEROSHOT_DATA), "--no-progress"]
GEN = ["generate", "--model", M, "--prompt", "Hi"]

# (id, argv, words the one-line message must contain)
CASES = [
    # the command line itself
    ("no-command", [], ["required"]),
    ("unknown-command", ["shrink"], ["invalid choice"]),
    ("unknown-option", ["eval", "--model", M, "--fast"], ["unrecognized", "--fast"]),
    # prune: keys and values
    ("ratio-range", PRUNE + ["prune.ratio=1.5"], ["prune.ratio", "[0, 1)"]),
    ("ratio-nan", PRUNE + ["prune.ratio=.nan"], ["prune.ratio"]),
    ("lr-inf", PRUNE + ["train.lr=.inf"], ["train.lr", "finite"]),
    ("steps-zero", ["prune", "train.steps=0"], ["train.steps"]),
    ("steps-text", ["prune", "train.steps=many"], ["train.steps", "whole number"]),
    ("section-scalar", ["prune", "prune=0.5"], ["prune is a section", "prune.ratio"]),
    ("section-list", ["prune", "train=[1]"], ["train is a section"]),
    ("unclosed-bracket", ["prune", "lora.targets=[q, v"], ["lora.targets", "YAML"]),
    ("at-sign", ["prune", "prune.criterion=@x"], ["prune.criterion", "quote"]),
    ("unknown-key", ["prune", "prune.rate=0.2"], ["unknown config key", "prune.rate"]),
    ("no-equals", ["prune", "prune.ratio"], ["key=value"]),
    ("empty-key", ["prune", "=3"], ["key=value"]),
    ("empty-data", ["prune", "data="], ["data is empty"]),
    ("empty-model", ["prune", "model="], ["model"]),
    ("criterion", ["prune", "prune.criterion=psychic"], ["criterion", "psychic"]),
    ("nm-pattern", ["prune", "prune.granularity=nm", "prune.nm=5:4"], ["prune.nm"]),
    ("nm-text", ["prune", "prune.granularity=nm", "prune.nm=half"], ["prune.nm"]),
    ("dtype", ["prune", "dtype=float8"], ["dtype"]),
    ("base-dtype", ["prune", "base_dtype=int4"], ["base_dtype"]),
    ("bool", ["prune", "prune.exclude_last=3"], ["prune.exclude_last", "true or false"]),
    ("targets", ["prune", "lora.targets=[lm_head]"], ["lora.targets", "lm_head"]),
    # prune: config files
    ("config-missing", ["prune", "--config", R + "/none.yaml"], ["none.yaml", "no such config file"]),
    ("config-dir", ["prune", "--config", R], ["a directory"]),
    ("config-latin1", ["prune", "--config", R + "/latin1.yaml"], ["latin1.yaml", "UTF-8"]),
    ("config-tab", ["prune", "--config", R + "/tab.yaml"], ["tab.yaml", "line 2"]),
    ("config-scalar-section", ["prune", "--config", R + "/scalar.yaml"], ["prune is a section"]),
    ("config-list", ["prune", "--config", R + "/list.yaml"], ["list.yaml", "mapping"]),
    ("config-unclosed", ["prune", "--config", R + "/unclosed.yaml"], ["unclosed.yaml", "line"]),
    ("config-twice", ["prune", "--config", R + "/twice.yaml"], ["twice.yaml", "twice"]),
    # prune: paths, model and data
    ("out-exists", PRUNE + [f"model={M}", f"out={R}/existing_run"], ["existing_run", "exists"]),
    ("out-under-file", PRUNE + [f"model={M}", f"out={R}/a_file/run"], ["a_file", "not a directory"]),
    ("model-missing", PRUNE + [f"model={R}/nothing", f"out={R}/o1"], ["nothing", "no such model"]),
    ("model-file", PRUNE + [f"model={R}/a_file", f"out={R}/o2"], ["a_file", "unsupported model"]),
    ("data-missing", PRUNE + [f"model={M}", f"data={R}/nothing.txt", f"out={R}/o3"], ["nothing.txt"]),
    ("data-binary", PRUNE + [f"model={M}", f"data={R}/binary.bin", f"out={R}/o4"], ["binary.bin"]),
    ("data-short", PRUNE + [f"model={M}", f"data={R}/short.txt", f"out={R}/o5"], ["short.txt"]),
    ("data-tfds", PRUNE + [f"model={M}", "data=tfds:no_such_set", f"out={R}/o6"], ["no_such_set"]),
    ("mesh", PRUNE + [f"model={M}", "mesh=pipeline:2", f"out={R}/o7"], ["pipeline"]),
    ("resume-missing", ["prune", "--resume", R + "/nothing"], ["nothing", "not a run directory"]),
    ("resume-overrides", ["prune", "--resume", R + "/existing_run", "prune.ratio=0.3"],
     ["give no overrides"]),
    ("resume-bad-json", ["prune", "--resume", R + "/run_bad_json"], ["run_config.json"]),
    ("resume-not-object", ["prune", "--resume", R + "/run_not_object"], ["run_config.json"]),
    # eval
    ("eval-no-model", ["eval"], ["--model"]),
    ("eval-model-missing", ["eval", "--model", R + "/nothing"], ["nothing", "no such model"]),
    ("eval-no-tokenizer", ["eval", "--model", R + "/notok"], ["notok", "tokenizer"]),
    ("eval-seq-len-0", EVAL + ["--seq-len", "0"], ["--seq-len", ">= 2"]),
    ("eval-seq-len-1", EVAL + ["--seq-len", "1"], ["--seq-len", ">= 2"]),
    ("eval-seq-len-text", EVAL + ["--seq-len", "long"], ["--seq-len", "whole number"]),
    ("eval-max-windows-0", EVAL + ["--max-windows", "0"], ["--max-windows", ">= 1"]),
    ("eval-batch-size-0", EVAL + ["--batch-size", "0"], ["--batch-size", ">= 1"]),
    ("eval-batch-size-neg", EVAL + ["--batch-size", "-4"], ["--batch-size"]),
    ("eval-text-missing", EVAL + ["--text", R + "/nothing.txt"], ["nothing.txt"]),
    ("eval-text-binary", EVAL + ["--text", R + "/binary.bin"], ["binary.bin"]),
    ("eval-text-tfds", EVAL + ["--text", "tfds:no_such_set"], ["no_such_set"]),
    ("eval-json-dir", EVAL + ["--json", R + "/json_dir"], ["json_dir", "is a directory"]),
    ("eval-json-under-file", EVAL + ["--json", R + "/a_file/out.json"], ["a_file", "not a directory"]),
    ("eval-mesh", EVAL + ["--mesh", "fsdp:7"], ["fsdp"]),
    ("eval-dtype", EVAL + ["--dtype", "float16"], ["--dtype", "invalid choice"]),
    ("eval-base-dtype", EVAL + ["--base-dtype", "int4"], ["--base-dtype"]),
    # zeroshot
    ("zs-no-tasks", ["zeroshot", "--model", M], ["--tasks"]),
    ("zs-unknown-task", ["zeroshot", "--model", M, "--tasks", "mmlu"], ["mmlu", "invalid choice"]),
    ("zs-limit-0", ZS + ["--limit", "0"], ["--limit", ">= 1"]),
    ("zs-batch-size-0", ZS + ["--batch-size", "0"], ["--batch-size"]),
    ("zs-data-dir-missing", ZS[:5] + ["--data-dir", R + "/nothing"], ["nothing"]),
    ("zs-data-file-missing", ZS[:5] + ["--data-dir", R], ["piqa"]),
    ("zs-json-dir", ZS + ["--json", R + "/json_dir"], ["json_dir", "is a directory"]),
    ("zs-model-missing", ["zeroshot", "--model", R + "/nothing", "--tasks", "piqa"], ["nothing"]),
    ("zs-no-tokenizer", ZS[:1] + ["--model", R + "/notok"] + ZS[3:], ["tokenizer"]),
    ("zs-source", ZS + ["--source", "hub"], ["--source", "invalid choice"]),
    # generate
    ("gen-no-prompt", ["generate", "--model", M], ["--prompt"]),
    ("gen-max-new-0", GEN + ["--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
    ("gen-max-new-huge", GEN + ["--max-new-tokens", "1000000000"], ["--max-new-tokens",
                                                                    "context length"]),
    ("gen-temperature-nan", GEN + ["--temperature", "nan"], ["--temperature"]),
    ("gen-temperature-inf", GEN + ["--temperature", "inf"], ["--temperature"]),
    ("gen-temperature-neg", GEN + ["--temperature", "-1"], ["--temperature", ">= 0"]),
    ("gen-top-p-0", GEN + ["--temperature", "1", "--top-p", "0"], ["--top-p", "> 0"]),
    ("gen-top-p-big", GEN + ["--temperature", "1", "--top-p", "1.5"], ["--top-p", "<= 1"]),
    ("gen-top-p-nan", GEN + ["--temperature", "1", "--top-p", "nan"], ["--top-p"]),
    ("gen-top-k-0", GEN + ["--temperature", "1", "--top-k", "0"], ["--top-k"]),
    ("gen-top-k-vocab", GEN + ["--temperature", "1", "--top-k", "100000"], ["--top-k", "vocabulary"]),
    ("gen-top-p-greedy", GEN + ["--top-p", "0.9"], ["--temperature"]),
    ("gen-system-no-chat", GEN + ["--system", "Be brief."], ["--chat"]),
    ("gen-no-tokenizer", ["generate", "--model", R + "/notok", "--prompt", "Hi"], ["tokenizer"]),
    ("gen-model-missing", ["generate", "--model", R + "/nothing", "--prompt", "Hi"], ["nothing"]),
    ("gen-mesh", GEN + ["--mesh", "tensor:5"], ["tensor"]),
]


@pytest.mark.parametrize("argv, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(files, argv, words, capsys, tmp_path,
                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run that wrongly started would write under runs/ here
    before = sorted(p.name for p in files["root"].rglob("*"))
    argv = [a.replace(M, str(files["model"])).replace(R, str(files["root"])) for a in argv]
    code, err = _run(argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert sorted(p.name for p in files["root"].rglob("*")) == before  # nothing made or removed
    assert list(tmp_path.iterdir()) == []


def test_there_are_at_least_sixty_cases_over_every_command():
    assert len(CASES) >= 60
    commands = {c[1][0] for c in CASES if c[1]}
    assert {"prune", "eval", "zeroshot", "generate"} <= commands
    assert sum("--config" in c[1] for c in CASES) >= 5


def test_options_and_overrides_may_be_intermixed():
    from loraprune_jax.cli import build_parser

    args = build_parser().parse_args(["prune", "prune.ratio=0.5", "--no-progress", "out=DIR",
                                      "--config", "c.yaml", "train.steps=3"])
    assert args.overrides == ["prune.ratio=0.5", "out=DIR", "train.steps=3"]
    assert args.no_progress and args.config == "c.yaml"
    args = build_parser().parse_args(["eval", "--seq-len", "128", "256", "--model", "m"])
    assert args.seq_len == [128, 256] and args.model == "m"


def test_number_types():
    positive = number(int, low=1)
    assert positive("3") == 3
    for text in ("0", "-1", "x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive(text)
    unit = number(float, low=0, low_open=True, high=1)
    assert unit("1") == 1.0 and unit("1e-3") == 1e-3
    for text in ("0", "1.01", "nan", "inf", "-inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            unit(text)


def test_output_checks(tmp_path):
    assert check_output_file(tmp_path / "new" / "deeper" / "x.json", "--json").name == "x.json"
    assert check_output_dir(tmp_path / "a" / "run", "out") == tmp_path / "a" / "run"
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    with pytest.raises(ValueError, match="broken symbolic link"):
        check_output_dir(tmp_path / "link" / "run", "out")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="permission denied"):
            check_output_file(locked / "x.json", "--json")


def test_os_errors_name_the_file_without_errno_decoration():
    e = OSError(28, "No space left on device", "out/model/x.safetensors")
    assert describe_error(e) == "out/model/x.safetensors: No space left on device"
    assert describe_error(ValueError("two\nlines")) == "two lines"
    from loraprune_jax.train.diskfull import DiskFullError  # an OSError that words itself

    full = DiskFullError("run/checkpoints", "saving a checkpoint", "then resume")
    assert describe_error(full) == str(full) == ("run/checkpoints: no space left on device while "
                                                 "saving a checkpoint; then resume")


def test_model_without_tokenizer_is_refused_before_loading(files, capsys, monkeypatch):
    import loraprune_jax.eval.loading as loading

    def boom(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_for_eval", boom)
    code, err = _run(["eval", "--model", str(files["root"] / "notok")], capsys)
    assert code == 2 and "tokenizer" in err
