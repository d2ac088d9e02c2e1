"""Text generation (``eval.generate``) and the ``generate`` command."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from conftest import byte_tokenizer, noisy_norms, tiny_config
from loraprune_jax.cli.generate import add_parser
from loraprune_jax.eval.generate import encode_prompts, generate_text, generate_with_stats
from loraprune_jax.models.decode import generate
from loraprune_jax.models.llama_params import init_base

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config("gqa", vocab_size=256)
    return cfg, noisy_norms(init_base(cfg, 0, std=0.3)), byte_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny):
    from loraprune_jax.io import save_hf_dir

    path = tmp_path_factory.mktemp("gen") / "model"
    cfg, base, tok = tiny
    save_hf_dir(path, cfg, base, tok)
    return path


def test_text_equals_decoded_token_generation(tiny):
    cfg, base, tok = tiny
    prompts = ["Hello there", "a", "The quick brown fox"]
    res = generate_with_stats(tiny, prompts, max_new_tokens=7, timed=False)
    assert res.inputs == prompts and res.new_tokens == 21
    for p, text, ids in zip(prompts, res.texts, res.token_ids):
        want = generate(base, cfg, [tok(p)["input_ids"]], 7)[0]
        assert ids == want.tolist()
        assert text == tok.decode(want)
    # the batch gives each prompt's own continuation
    assert generate_text(tiny, prompts[1:2], max_new_tokens=7) == res.texts[1:2]


def test_eos_truncates_text(tiny):
    cfg, base, tok = tiny
    free = generate_with_stats(tiny, ["Hello"], max_new_tokens=8, timed=False).token_ids[0]
    stop = next(i for i in range(1, 8) if free[i] not in free[:i])
    with_eos = (dataclasses.replace(cfg, eos_token_id=free[stop]), base, tok)
    res = generate_with_stats(with_eos, ["Hello"], max_new_tokens=8, timed=False)
    assert res.token_ids[0] == free[: stop + 1]
    assert res.texts[0] == tok.decode(free[:stop])


def test_chat_template(tiny, capsys):
    cfg, base, tok = tiny
    chat_tok = byte_tokenizer()
    chat_tok.chat_template = TEMPLATE
    texts, ids = encode_prompts(chat_tok, ["hi", "yo"], chat=True, system="be brief")
    assert texts == [f"<system>be brief\n<user>{p}\n<assistant>" for p in ("hi", "yo")]
    assert ids[0] == chat_tok(texts[0])["input_ids"]
    res = generate_with_stats((cfg, base, chat_tok), ["hi"], max_new_tokens=4, chat=True,
                              timed=False)
    assert res.inputs == ["<user>hi\n<assistant>"]
    want = generate(base, cfg, [chat_tok(res.inputs[0])["input_ids"]], 4)[0]
    assert res.token_ids[0] == want.tolist()
    # no template: plain prompts, with a warning
    texts, _ = encode_prompts(tok, ["hi"], chat=True)
    assert texts == ["hi"] and "no chat template" in capsys.readouterr().err


def test_sampling_options_reach_the_decoder(tiny):
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.95, top_k=50)
    a = generate_text(tiny, ["Hello"], seed=1, **kw)
    assert a == generate_text(tiny, ["Hello"], seed=1, **kw)
    assert a != generate_text(tiny, ["Hello"], seed=2, **kw)


def _parser():
    parser = argparse.ArgumentParser(prog="loraprune-jax")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.mark.slow
def test_cli_generate(tiny, tiny_dir, capsys):
    cfg, base, tok = tiny
    args = _parser().parse_args(
        ["generate", "--model", str(tiny_dir), "--prompt", "Hello there", "--prompt", "ab",
         "--max-new-tokens", "5"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    want = generate_text(tiny, ["Hello there", "ab"], max_new_tokens=5)
    assert f"### prompt 1: Hello there\n{want[0]}\n" in out
    assert f"### prompt 2: ab\n{want[1]}\n" in out
    assert "10 new tokens in" in out and "tokens/s" in out


def test_cli_main_wires_generate(tiny_dir, capsys):
    from loraprune_jax import cli

    assert cli.main(["generate", "--model", str(tiny_dir), "--prompt", "Hi",
                     "--max-new-tokens", "3"]) == 0
    assert "### prompt 1: Hi" in capsys.readouterr().out
    assert cli.main(["generate", "--model", str(tiny_dir / "missing"), "--prompt", "Hi"]) == 2


@pytest.mark.slow
def test_smollm2_chat_answers(smollm2):
    texts = generate_text(smollm2, ["What is the capital of France?"], max_new_tokens=16, chat=True)
    print(texts)
    assert "Paris" in texts[0]
