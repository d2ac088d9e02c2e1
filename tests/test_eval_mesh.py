"""Evaluation on a device mesh (8 simulated CPU devices): perplexity, zero-shot log-likelihoods
and accuracies, and greedy generation equal one device's; ``--mesh``/``--distributed`` on the
``eval``, ``zeroshot`` and ``generate`` commands."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import ZEROSHOT_DATA as DATA, byte_tokenizer, harness_requests, noisy_norms, tiny_config
from loraprune_jax.cli import main
from loraprune_jax.eval.generate import generate_text
from loraprune_jax.eval.harness_eval import harness_zeroshot
from loraprune_jax.eval.loglikelihood import encode_requests, score_tokens
from loraprune_jax.eval.perplexity import perplexity
from loraprune_jax.models.decode import generate
from loraprune_jax.models.llama_params import init_base, shard_base
from loraprune_jax.parallel.mesh import make_mesh

MESHES = ["fsdp:8", "data:2,fsdp:2,tensor:2"]
TEXT = "The quick brown fox jumps over the lazy dog. " * 12


@pytest.fixture(scope="module")
def tiny():
    """GQA, 6 query / 2 KV heads, hidden 48, MLP 40, vocabulary 256: every mesh above divides it."""
    cfg = tiny_config("gqa", vocab_size=256)
    return cfg, noisy_norms(init_base(cfg, 0, std=0.3)), byte_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny):
    from loraprune_jax.io import save_hf_dir

    path = tmp_path_factory.mktemp("mesh") / "model"
    save_hf_dir(path, *tiny)
    return path


def pruned():
    """Per-layer widths (list layout), one layer without attention: placed unstacked."""
    cfg = tiny_config("gqa", vocab_size=256, layer_num_heads=(6, 3, 0),
                      layer_num_kv_heads=(2, 1, 0), layer_intermediate_size=(40, 17, 9))
    return cfg, init_base(cfg, 1, std=0.3)


@pytest.mark.parametrize("spec", MESHES)
def test_perplexity_on_a_mesh_equals_one_device(tiny, spec):
    cfg, base, tok = tiny
    ids = np.asarray(tok(TEXT)["input_ids"])
    want = perplexity(base, cfg, ids, 32, batch_size=3, progress=False)
    mesh = make_mesh(spec)
    got = perplexity(shard_base(base, cfg, mesh), cfg, ids, 32, batch_size=3, progress=False,
                     mesh=mesh)
    assert got.windows == want.windows == len(ids) // 32
    assert got.ppl == pytest.approx(want.ppl, rel=1e-5)


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
    """The harness's requests for the first fixture documents of PIQA and WinoGrande."""
    def of(tasks, limit):
        built = harness_requests(tasks, DATA, tmp_path_factory.mktemp("tasks"), limit=limit)
        return [r for task in tasks for reqs, _ in built[task] for r in reqs]
    return of


@pytest.mark.parametrize("spec", MESHES)
def test_loglikelihoods_on_a_mesh_equal_one_device(tiny, spec, requests):
    cfg, base, tok = tiny
    encoded = encode_requests(tok, requests(["piqa", "winogrande"], limit=2))
    want_ll, want_greedy = score_tokens(base, cfg, encoded, batch_size=3, bucket=64,
                                        progress=False)
    mesh = make_mesh(spec)
    got_ll, got_greedy = score_tokens(shard_base(base, cfg, mesh), cfg, encoded, batch_size=3,
                                      bucket=64, progress=False, mesh=mesh)
    np.testing.assert_allclose(got_ll, want_ll, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got_greedy, want_greedy)


def test_harness_zeroshot_on_a_mesh_places_the_base_and_equals_one_device(tiny, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg, base, tok = tiny
    tasks = ["arc_easy"]
    kw = dict(data_dir=DATA, limit=2, progress=False, keep_samples=True)
    want = harness_zeroshot(base, cfg, tok, tasks, **kw)
    got = harness_zeroshot(base, cfg, tok, tasks, mesh=make_mesh("fsdp:-1"), **kw)  # host base
    for name in tasks:
        assert got[name].acc == want[name].acc and got[name].acc_norm == want[name].acc_norm
        for g, w in zip(got[name].samples, want[name].samples):
            np.testing.assert_allclose(g["lls"], w["lls"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_pruned_model_scores_on_a_mesh(tiny, requests):
    cfg, base = pruned()
    tok = tiny[2]
    encoded = encode_requests(tok, requests(["piqa"], limit=1))
    want, _ = score_tokens(base, cfg, encoded, bucket=64, progress=False)
    mesh = make_mesh("fsdp:8")
    placed = shard_base(base, cfg, mesh)
    assert isinstance(placed["layers"], list)  # per-layer widths stay a list
    got, _ = score_tokens(placed, cfg, encoded, bucket=64, progress=False, mesh=mesh)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", MESHES)
def test_greedy_generation_on_a_mesh_equals_one_device(tiny, spec):
    cfg, base, tok = tiny
    prompts = [tok(p)["input_ids"] for p in ("Hello there", "a", "The quick brown fox")]
    want = generate(base, cfg, prompts, 12, eos_id=None)
    mesh = make_mesh(spec)
    got = generate(shard_base(base, cfg, mesh), cfg, prompts, 12, eos_id=None, mesh=mesh)
    assert got.shape == want.shape == (3, 12)  # three rows, padded to the batch axes and back
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_generation_of_a_pruned_model_and_text_on_a_mesh(tiny):
    cfg, base = pruned()
    tok = tiny[2]
    prompts = ["Hello there", "ab"]
    model = (cfg, base, tok)
    want = generate_text(model, prompts, max_new_tokens=8)
    assert generate_text(model, prompts, max_new_tokens=8, mesh=make_mesh("fsdp:8")) == want


# ----------------------------------------------------------------------------- the commands
def test_cli_eval_with_mesh_prints_the_same_perplexity(tiny_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    args = ["eval", "--model", str(tiny_dir), "--text", str(text), "--seq-len", "32",
            "--batch-size", "3", "--no-progress"]
    assert main(args + ["--json", str(tmp_path / "one.json")]) == 0
    assert main(args + ["--json", str(tmp_path / "mesh.json"), "--mesh", "fsdp:-1"]) == 0
    one = json.loads((tmp_path / "one.json").read_text())
    got = json.loads((tmp_path / "mesh.json").read_text())
    assert got["tokens"] == one["tokens"] and got["ppl"] == pytest.approx(one["ppl"], rel=1e-5)
    assert "mesh data:1,fsdp:8,tensor:1" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_zeroshot_with_mesh_writes_the_same_results(tiny_dir, tmp_path):
    args = ["zeroshot", "--model", str(tiny_dir), "--tasks", "winogrande", "piqa", "--data-dir",
            str(DATA), "--limit", "2", "--samples", "--no-progress"]
    assert main(args + ["--json", str(tmp_path / "one.json")]) == 0
    assert main(args + ["--json", str(tmp_path / "mesh.json"), "--mesh",
                        "data:2,fsdp:-1,tensor:2"]) == 0
    one = json.loads((tmp_path / "one.json").read_text())["results"]
    got = json.loads((tmp_path / "mesh.json").read_text())["results"]
    for name in ("winogrande", "piqa"):
        assert got[name]["acc"] == one[name]["acc"]
        for g, w in zip(got[name]["samples"], one[name]["samples"]):
            np.testing.assert_allclose(g["lls"], w["lls"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_cli_generate_with_mesh_prints_the_same_text(tiny_dir, capsys):
    args = ["generate", "--model", str(tiny_dir), "--prompt", "Hello there", "--prompt", "ab",
            "--prompt", "xyz", "--max-new-tokens", "6"]
    assert main(args) == 0
    one = capsys.readouterr().out
    assert main(args + ["--mesh", "fsdp:-1"]) == 0
    got = capsys.readouterr().out
    texts = lambda out: out.split("new tokens in")[0]  # noqa: E731 - the timings differ
    assert "### prompt 3: xyz" in one and texts(got) == texts(one)


@pytest.mark.parametrize("command", [
    ["eval", "--text", "lee"], ["zeroshot", "--tasks", "boolq", "--data-dir", str(DATA)],
    ["generate", "--prompt", "x"],
])
def test_bad_meshes_are_one_line_and_exit_2_before_loading(tiny_dir, command, capsys):
    def run(spec):
        rc = main([command[0], "--model", str(tiny_dir), *command[1:], "--mesh", spec])
        err = capsys.readouterr().err.strip().splitlines()
        return rc, err

    rc, err = run("fsdp:3,data:x")
    assert rc == 2 and len(err) == 1 and "has size 'x', not an integer" in err[0]
    rc, err = run("tensor:8")  # 6 query heads, 2 KV heads, 40 MLP channels
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: mesh data:1,fsdp:1,tensor:8 "
                                                           "does not fit the model")
