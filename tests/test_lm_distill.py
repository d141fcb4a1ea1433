"""Language-model students distilled from token caches (distill/lm.py) on tiny GPT-2s."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from kdcache.cache.errors import KdcacheError
from kdcache.distill.lmdata import Flat, collate
from kdcache.distill.study import parse_grid

from tests.clitools import cli


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory, tiny_lm_dir):
    """A train/test corpus folder, top-k and sampled caches of the tiny teacher, a config-only
    student (1 layer, no tokenizer: it uses the cache's)."""
    from transformers import GPT2Config

    from tests.lmtools import write_corpus

    root = tmp_path_factory.mktemp("lm_distill")
    data = root / "data"
    write_corpus(data / "train.jsonl", 16, seed=0, max_words=25)
    write_corpus(data / "test.jsonl", 4, seed=1)
    caches = {}
    for name, opt in (("topk", ("--topk", 8)), ("sampled", ("--sampled", 8))):
        caches[name] = root / f"{name}.zarr"
        cli("precompute", "--teacher", f"hf:{tiny_lm_dir}", "--dataset", "text", "--data-root",
            data, "--max-length", 24, "--chunk-samples", 16, *opt,
            "--out", caches[name])  # fmt: skip
    student = root / "student"
    GPT2Config(vocab_size=300, n_positions=32, n_embd=16, n_layer=1, n_head=2).save_pretrained(
        student
    )
    return {"data": data, "caches": caches, "student": student, "root": root}


def _distill(s, cache, out, *extra, ok=True):
    return cli("distill", "--student", f"hf:{s['student']}", "--cache", cache, "--loss", "kd",
               "--dataset", "text", "--data-root", s["data"], "--optimizer", "adamw", "--lr",
               "1e-2", "--schedule", "constant", "--batch-size", 8, "--out", out, *extra,
               ok=ok)  # fmt: skip


def _records(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_kd_student_trains_from_a_topk_cache(lm_setup, tmp_path):
    out = tmp_path / "kd"
    res = _distill(lm_setup, lm_setup["caches"]["topk"], out, "--epochs", 2)
    recs = _records(out)
    assert [r["epoch"] for r in recs] == [0, 1]
    assert recs[-1]["test_loss"] < recs[0]["test_loss"]  # held-out loss decreases
    assert recs[-1]["kd"] < recs[0]["kd"] and recs[-1]["loss"] < recs[0]["loss"]
    for r in recs:
        assert r["test_ppl"] == pytest.approx(math.exp(r["test_loss"]), rel=1e-5)
        assert r["tokens"] > 0 and r["test_tokens"] > 0
    assert "held-out loss" in res.output and "ppl" in res.output
    for name in ("last.pt", "best.pt", "metrics.jsonl", "config.yaml", "hf/config.json"):
        assert (out / name).exists(), name
    # the exported student is a causal LM on the teacher's tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "hf")
    assert len(AutoTokenizer.from_pretrained(out / "hf")) == 300
    again = _distill(lm_setup, lm_setup["caches"]["topk"], out, "--epochs", 2, "--resume")
    assert "already finished" in again.output


def test_sampled_cache_trains(lm_setup, tmp_path):
    out = tmp_path / "sampled"
    _distill(lm_setup, lm_setup["caches"]["sampled"], out, "--epochs", 2, "--test-split", "none")
    recs = _records(out)
    assert len(recs) == 2 and "test_loss" not in recs[0]
    assert all(math.isfinite(r["kd"]) and r["kd"] >= 0 for r in recs)
    assert recs[1]["loss"] < recs[0]["loss"]


def test_student_with_another_tokenizer_is_refused(lm_setup, tmp_path):
    from tests.lmtools import make_tokenizer

    other = tmp_path / "other"
    make_tokenizer(other, vocab_size=280, chat=False)
    from transformers import GPT2Config

    GPT2Config(vocab_size=300, n_positions=32, n_embd=16, n_layer=1, n_head=2).save_pretrained(
        other
    )
    out = tmp_path / "bad"
    res = cli("distill", "--student", f"hf:{other}", "--cache", lm_setup["caches"]["topk"],
              "--loss", "kd", "--test-split", "none", "--out", out, ok=False)  # fmt: skip
    assert res.exit_code == 2
    lines = [x for x in res.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "do not share a tokenizer" in lines[0]
    assert str(other) in lines[0] and "teacher" in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_kd_without_cache_and_other_corpus_are_refused(lm_setup, tmp_path):
    from tests.lmtools import write_corpus

    res = cli("distill", "--student", f"hf:{lm_setup['student']}", "--loss", "kd", "--dataset",
              "text", "--data-root", lm_setup["data"], "--out", tmp_path / "a",
              ok=False)  # fmt: skip
    assert res.exit_code == 2 and "needs the teacher's targets" in res.output
    other = write_corpus(tmp_path / "other" / "train.jsonl", 5, seed=7).parent
    res = _distill({**lm_setup, "data": other}, lm_setup["caches"]["topk"], tmp_path / "b",
                   "--test-split", "none", ok=False)  # fmt: skip
    assert res.exit_code == 2 and "is not the data of the cache" in res.output


def test_collate_keeps_positions_whose_next_token_counts():
    # two rows (3 and 2 tokens); the loss mask drops token 2 of row 0
    f = Flat(np.array([5, 6, 7, 8, 9]), np.array([3, 2]), np.array([1, 1, 0, 1, 1], bool),
             "topk", np.arange(10).reshape(5, 2), np.zeros((5, 2), np.float32),
             np.zeros(5, np.float32))  # fmt: skip
    b = collate(f)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["keep"].tolist() == [[True, False, False], [True, False, False]]
    assert b["labels"].tolist() == [6, 9]
    assert b["targets"].ids.tolist() == [[0, 1], [6, 7]]  # tokens 0 and 3 (flat) predict


def _weights(out):
    import torch

    return torch.load(out / "last.pt", weights_only=True)["model"]


def test_killed_run_resumes_to_the_same_weights(lm_setup, tmp_path):
    """--max-steps 4 (one epoch of 4 steps) stops after epoch 0, as a kill after its checkpoint;
    --resume finishes it. The student has dropout: each epoch's masks come from (seed, epoch),
    not from the RNG's past."""
    import torch

    cache = lm_setup["caches"]["topk"]
    _distill(lm_setup, cache, tmp_path / "straight", "--epochs", 2)
    _distill(lm_setup, cache, tmp_path / "killed", "--epochs", 2, "--max-steps", 4)
    assert [r["epoch"] for r in _records(tmp_path / "killed")] == [0]
    _distill(lm_setup, cache, tmp_path / "killed", "--epochs", 2, "--resume")
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = ("epoch_seconds", "tokens_per_s")
    ra, rb = (
        [{k: v for k, v in r.items() if k not in drop} for r in _records(tmp_path / d)]
        for d in ("straight", "killed")
    )
    assert ra == rb and len(ra) == 2


def test_ddp_two_ranks_equal_one_process(lm_setup, tmp_path):
    """torchrun 2 ranks = 1 process with the same global batch (no dropout: its masks are
    drawn per rank). Rows of uneven token counts per rank, and a last global batch of one row,
    so rank 1 has an empty share there."""
    import torch
    from kdcache.cache.tokens import open_token_cache
    from transformers import GPT2Config

    from tests.clitools import torchrun

    student = tmp_path / "nodrop"
    GPT2Config(vocab_size=300, n_positions=32, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
               embd_pdrop=0.0, attn_pdrop=0.0).save_pretrained(student)  # fmt: skip
    with open_token_cache(str(lm_setup["caches"]["topk"])) as c:
        n = len(c)
    bs = next(b for b in range(4, n) if n % b == 1)  # the last global batch: one row
    args = ["distill", "--student", f"hf:{student}", "--cache", lm_setup["caches"]["topk"],
            "--loss", "kd", "--dataset", "text", "--data-root", lm_setup["data"], "--optimizer",
            "adamw", "--lr", "1e-2", "--schedule", "constant", "--batch-size", bs, "--epochs",
            1, "--device", "cpu"]  # fmt: skip
    cli(*args, "--out", tmp_path / "one")
    p = torchrun(2, *args, "--out", tmp_path / "two")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("done: epoch 1") == 1, p.stdout  # rank 0 reports, once
    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [r["epoch"] for r in two] == [0]  # written once, by rank 0
    for a, b in zip(one, two, strict=True):
        assert a["step"] == b["step"] == -(-n // bs)
        assert a["tokens"] == b["tokens"] and a["test_tokens"] == b["test_tokens"]
        for k in ("loss", "ce", "kd", "test_loss", "test_ppl"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k
    wa, wb = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "two" / "hf" / "config.json").exists()


def _lm_study(s, out, **kw):
    from kdcache.distill.study import StudySpec

    distill = {"dataset": "text", "data_root": str(s["data"]), "epochs": 1,
               "batch_size": 8, "optimizer": "adamw", "lr": 1e-2, "device": "cpu"}  # fmt: skip
    base = dict(out=str(out), losses=["ce", "kd"], seeds=[0, 1],
                students=[f"hf:{s['student']}"], cache=str(s["caches"]["topk"]),
                distill=distill)  # fmt: skip
    return StudySpec(**{**base, **kw})


def test_study_on_a_token_cache_reports_held_out_perplexity(lm_setup, tmp_path):
    """ce and kd x 2 seeds through the CLI: test_ppl per run, means, paired stats (lower wins)."""
    out = tmp_path / "st"
    res = cli("study", "--cache", lm_setup["caches"]["topk"], "--losses", "ce,kd", "--seeds",
              "0,1", "--students", f"hf:{lm_setup['student']}", "--dataset", "text",
              "--data-root", lm_setup["data"], "--epochs", 1, "--batch-size", 8, "--lr", "1e-2",
              "--schedule", "constant", "--set", 'optimizer="adamw"', "--device", "cpu",
              "--jobs", 2, "--out", out)  # fmt: skip
    assert "Held-out perplexity (`test_ppl`, lower is better)" in res.output
    assert "test_ppl mean ± std" in res.output
    rep = json.loads((out / "study.json").read_text())
    assert rep["metric"] == "test_ppl" and rep["better"] == "lower"
    runs = {(r["variant"], r["seed"]): r for r in rep["runs"]}
    assert set(runs) == {(v, s) for v in ("ce", "kd") for s in (0, 1)}
    for r in runs.values():  # each run's result is its final epoch's held-out perplexity
        assert r["test_ppl"] == pytest.approx(math.exp(r["test_loss"]), rel=1e-5)
    summ = {x["variant"]: x for x in rep["summary"]}
    ppl = {v: [runs[(v, s)]["test_ppl"] for s in (0, 1)] for v in ("ce", "kd")}
    assert summ["kd"]["n"] == 2 and summ["kd"]["mean"] == pytest.approx(np.mean(ppl["kd"]))
    assert summ["ce"]["std"] == pytest.approx(np.std(ppl["ce"], ddof=1))
    (c,) = rep["comparisons"]
    d = np.subtract(ppl["kd"], ppl["ce"])
    assert (c["a"], c["b"], c["n"]) == ("kd", "ce", 2)
    assert c["mean_diff"] == pytest.approx(d.mean()) and c["wins"] == int((d < 0).sum())
    assert c["p_ttest"] is None or 0 <= c["p_ttest"] <= 1
    assert (out / "study.csv").exists() and (out / "study_comparisons.csv").exists()


def test_lm_study_plans_grids_and_refuses_before_launching(lm_setup, tmp_path):
    from kdcache.distill.study import plan, run_config, run_study
    from transformers import GPT2Config

    spec = _lm_study(lm_setup, tmp_path / "g", hparam_grid=parse_grid(["kd:T=1,2", "alpha=0.3"]))
    runs = plan(spec)
    assert spec.task == "lm"
    assert sorted({r.variant for r in runs}) == ["ce", "kd[T=1,alpha=0.3]", "kd[T=2,alpha=0.3]"]
    hp = {r.variant: run_config(spec, r)["hparams"] for r in runs}
    assert hp["ce"] == {} and hp["kd[T=2,alpha=0.3]"] == {"T": 2, "alpha": 0.3}
    cases = {
        "wsl": (dict(losses=["ce", "wsl"]), "--losses wsl: not a loss for language-model"),
        "lsr": (dict(losses=["lsr"]), "--losses lsr: not a loss for language-model"),
        "T": (dict(hparam_grid=parse_grid(["kd:T=0"])), "T=0, expected a number > 0"),
        "student": (dict(students=["resnet8"]), "--students 'resnet8' is not a causal"),
        "no-cache": (dict(cache=None), "--losses kd needs the teacher's targets"),
        "held-out": (
            dict(distill={"dataset": "text", "data_root": str(tmp_path / "none")}),
            "held-out split",
        ),  # fmt: skip
        "none": (dict(distill={"test_split": "none"}), "reports the held-out perplexity"),
        "ema": (
            dict(distill={"ema": True, "data_root": str(lm_setup["data"]), "dataset": "text"}),
            "--ema is not supported",
        ),  # fmt: skip
    }
    from tests.lmtools import make_tokenizer

    other = tmp_path / "other-tok"
    make_tokenizer(other, vocab_size=280, chat=False)
    GPT2Config(vocab_size=300, n_positions=32, n_embd=16, n_layer=1, n_head=2).save_pretrained(
        other
    )
    cases["tokenizer"] = (dict(students=[f"hf:{other}"]), "do not share a tokenizer")
    for case, (kw, expect) in cases.items():
        out = tmp_path / case
        with pytest.raises(KdcacheError, match=re.escape(expect)):
            run_study(_lm_study(lm_setup, out, **kw))
        assert not out.exists(), case  # refused before anything was launched or written


def test_perplexity_report_counts_lower_as_a_win(tmp_path):
    from kdcache.distill.science_lm import report
    from kdcache.distill.study_stats import paired, write_report

    ce, kd = [150.0, 160.0, 170.0], [140.0, 161.0, 152.0]  # kd lower on seeds 0 and 2
    rows = [{"student": "s", "variant": v, "seed": i, "test_ppl": p}
            for v, ps in (("ce", ce), ("kd", kd)) for i, p in enumerate(ps)]  # fmt: skip
    c = paired(rows, "kd", "ce", "s", "test_ppl")
    assert (c["wins"], c["ties"], c["n"]) == (2, 0, 3) and c["mean_diff"] == pytest.approx(-9.0)
    assert paired(rows, "ce", "kd", "s", "test_ppl")["wins"] == 1
    r = write_report(rows, tmp_path, "lm", "ce", [], "test_ppl")
    assert "| s | kd − ce | 3 | -9.0000 | 2 / 0 / 3 |" in r["markdown"]
    assert "| s | ce | 3 | 160.0000 ± 10.0000 | 150.0000 | 170.0000 |" in r["markdown"]
    assert json.loads((tmp_path / "lm.json").read_text())["better"] == "lower"
    sci = [{**x, "student": "gpt2-1x32", "variant": "kd-top16" if x["variant"] == "kd" else "ce"}
           for x in rows]  # fmt: skip
    report(tmp_path, sci, {}, {"test_ppl": 97.0}, 512)  # make science-lm's table
    assert (
        "| kd-top16 | 151.000 ± 10.536 (n=3) | -9.000 | 2/3 lower |"
        in (tmp_path / "report.md").read_text()
    )
