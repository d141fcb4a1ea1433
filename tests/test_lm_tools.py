"""Token caches: kill -9 resume, verify, info/ls/merge/convert/push, bad input, chat, top-p."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from kdcache.cache.tokens import open_token_cache

from tests.clitools import ROOT, cli, proc_env

ARGS = ("--dataset", "text", "--max-length", 24, "--chunk-samples", 8)


def _pre(teacher, corpus, out, *extra, ok=True):
    return cli("precompute", "--teacher", f"hf:{teacher}", "--data-root", corpus, *ARGS,
               "--out", out, *extra, ok=ok)  # fmt: skip


def _same(a, b) -> None:
    with open_token_cache(str(a)) as ca, open_token_cache(str(b)) as cb:
        assert ca.key == cb.key and ca.n_chunks == cb.n_chunks
        assert ca.attrs["checksums"] == cb.attrs["checksums"]
        for c in range(ca.n_chunks):
            ra, rb = ca.read_chunk_stored(c, verify=True), cb.read_chunk_stored(c, verify=True)
            for n in ra:
                np.testing.assert_array_equal(ra[n], rb[n])


KILLER = """
import os, signal, sys
from kdcache.cache import tokens
orig = tokens.TokenWriter.write_chunk
state = {"n": 0}
def write_chunk(self, c, arrays):
    state["n"] += 1
    if state["n"] == 3:  # die in the middle of chunk 3: arrays written, no checksum/done
        self._b.write("input_ids", int(self.chunk_bounds[c]), arrays["input_ids"][:5] + 1)
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(self, c, arrays)
tokens.TokenWriter.write_chunk = write_chunk
from kdcache.cli import main
sys.argv = ["kdcache"] + sys.argv[1:]
main()
"""


def test_kill9_resume_is_bit_identical(tiny_lm_dir, lm_corpus, tmp_path):
    ref, out = tmp_path / "ref.zarr", tmp_path / "out.zarr"
    _pre(tiny_lm_dir, lm_corpus, ref, "--topk", 4)
    args = ["precompute", "--teacher", f"hf:{tiny_lm_dir}", "--data-root", str(lm_corpus),
            *map(str, ARGS), "--out", str(out), "--topk", "4"]  # fmt: skip
    p = subprocess.run([sys.executable, "-c", KILLER, *args], cwd=ROOT, env=proc_env(),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == -9, p.stderr[-2000:]
    with open_token_cache(str(out), allow_incomplete=True) as c:
        assert not c.is_complete() and c.done().sum() == 2
    with pytest.raises(Exception, match="incomplete"):
        open_token_cache(str(out))
    _pre(tiny_lm_dir, lm_corpus, out, "--topk", 4)  # the same command resumes (stale lock)
    _same(ref, out)


def test_verify_info_ls_convert_merge_push(tiny_lm_dir, lm_corpus, tmp_path):
    src = tmp_path / "src.zarr"
    _pre(tiny_lm_dir, lm_corpus, src, "--topk", 4, "--top-p", "0.5", "--kl-sample", 3)
    info = json.loads(cli("cache", "info", src, "--json").output)
    assert info["kind"] == "tokens" and info["k"] == 4 and info["top_p"] == 0.5
    assert info["bytes_per_token"] == 2 + 1 + 4 * 2 + 4 * 2 + 2  # ids u16, mask, K ids+lp, tail
    assert info["megatron_bytes_per_token"] == 2 * 4 + 17 * 4 / 8
    assert info["kl_sample"]["tokens"] > 0
    assert "token cache" in cli("cache", "info", src).output
    assert str(src) in cli("cache", "ls", tmp_path).output
    with open_token_cache(str(src)) as c:  # top-p: entries past the nucleus are id 0 / -inf
        _i, ids, lp, tail = c.tokens(0)
        cut = ~np.isfinite(lp)
        assert (ids[cut] == 0).all()
        kept = np.exp(lp).sum(1)
        assert np.allclose(kept + np.exp(tail), 1, atol=2e-2)
    h5 = tmp_path / "c.h5"
    cli("cache", "convert", src, h5)
    back = tmp_path / "back.zarr"
    cli("cache", "convert", h5, back)
    _same(src, back)
    pushed = tmp_path / "shared" / "p.zarr"
    cli("cache", "push", src, pushed)
    _same(src, pushed)
    # shards: two partial caches merge into the full one
    parts = []
    for i in range(2):
        p = tmp_path / f"s{i}.zarr"
        _pre(tiny_lm_dir, lm_corpus, p, "--topk", 4, "--top-p", "0.5", "--shard", f"{i}/2")
        parts.append(p)
    with open_token_cache(str(parts[0]), allow_incomplete=True) as c:
        assert not c.is_complete() and c.missing_chunks()
    merged = tmp_path / "m.zarr"
    cli("cache", "merge", merged, *parts)
    _same(src, merged)
    assert cli("cache", "verify", src).exit_code == 0
    # corrupt one stored object of chunk 1: verify names the chunk, exit 1
    with open_token_cache(str(src)) as c:
        lo = int(c.chunk_bounds[1]) // c.spec["storage"]["token_chunk"]
    obj = src / "logprobs" / "c" / str(lo) / "0"
    raw = bytearray(obj.read_bytes())
    raw[10] ^= 0xFF
    obj.write_bytes(bytes(raw))
    res = cli("cache", "verify", src, ok=False)
    assert res.exit_code == 1 and "chunk 1" in res.output


def test_bad_input_one_error_line_nothing_written(tiny_lm_dir, tiny_bert_dir, lm_corpus, tmp_path):
    out = tmp_path / "out"
    cases = [
        (["--teacher", f"hf:{tiny_bert_dir}", "--token-cache"], "not a causal language model"),
        (["--teacher", f"hf:{tiny_lm_dir}", "--max-length", "65"], "beyond the teacher's 64"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n{"body": "no text"}\n')
    for extra, msg in cases + [(["--teacher", f"hf:{tiny_lm_dir}", "--data-root", str(bad)],
                                "row 1 has no 'text'")]:  # fmt: skip
        args = ["precompute", "--dataset", "text", "--data-root", str(lm_corpus), "--topk", "4",
                "--out", str(out), *extra]  # fmt: skip
        res = cli(*args, ok=False)
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], res.output
        assert not out.exists() or not any(out.rglob("zarr.json"))


def test_chat_rows_mask_assistant_tokens_hdf5(tiny_lm_dir, tmp_path):
    rows = [{"id": "c0", "messages": [{"role": "user", "content": "the cat sat"},
                                      {"role": "assistant", "content": "on the mat"}]},
            {"id": "t1", "text": "a dog ran in the park"}]  # fmt: skip
    corpus = tmp_path / "chat.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "chat.h5"
    cli("precompute", "--teacher", f"hf:{tiny_lm_dir}", "--dataset", "text", "--data-root",
        corpus, "--max-length", 64, "--sampled", 8, "--out", out)  # fmt: skip
    with open_token_cache(str(out)) as c:
        assert c.backend_name == "hdf5" and c.keys == ["c0#0", "t1#0"]
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(c.tokenizer_dir())
        ids = c.tokens(0)[0]
        m = c.loss_mask(0)
        assert 0 < m.sum() < len(m)
        assert "on the mat" in tok.decode(ids[m].tolist())
        assert "the cat sat" not in tok.decode(ids[m].tolist())
        assert c.loss_mask(1).all()
        assert c.verify()["ok"] and os.path.getsize(out) > 0
