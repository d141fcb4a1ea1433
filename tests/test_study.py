"""`kdcache study`: statistics on a fixed fake result set, resume, planning errors, one real run."""

from __future__ import annotations

import csv
import dataclasses
import json
import math

import pytest
from kdcache.cache.errors import KdcacheError
from kdcache.distill import study as study_mod
from kdcache.distill.study import StudySpec, parse_grid, parse_seeds, plan, run_config, run_study
from kdcache.distill.study_stats import comparisons, paired, summarize, write_report

from tests.clitools import cli

CE = [0.80, 0.82, 0.84, 0.86, 0.88]
KD = [0.81, 0.84, 0.87, 0.90, 0.93]  # ce + 0.01·(1..5): every seed wins


def fake_rows() -> list[dict]:
    rows = []
    for variant, accs in (("ce", CE), ("kd", KD), ("wsl", CE)):
        for seed, acc in enumerate(accs):
            rows.append({"student": "r8", "variant": variant, "seed": seed, "test_acc": acc})
    rows.append({"student": "r8", "variant": "kd", "seed": 9, "test_acc": 0.5})  # unpaired
    return rows


def test_summary_and_paired_tests_on_known_values():
    s = {x["variant"]: x for x in summarize(fake_rows())}
    assert s["ce"]["n"] == 5 and s["ce"]["mean"] == pytest.approx(0.84)
    assert s["ce"]["std"] == pytest.approx(math.sqrt(0.001))  # deviations ±.04, ±.02, 0; n−1
    assert (s["ce"]["min"], s["ce"]["max"]) == (0.80, 0.88)
    assert s["kd"]["n"] == 6  # the unpaired seed counts in the summary
    c = paired(fake_rows(), "kd", "ce", "r8")
    assert c["n"] == 5 and c["wins"] == 5 and c["ties"] == 0
    assert c["mean_diff"] == pytest.approx(0.03)
    # d = .01..05: mean .03, sd sqrt(2.5e-4), t = .03 / (sd / sqrt 5) = 4.2426 on 4 df
    assert c["p_ttest"] == pytest.approx(0.013236, abs=2e-6)
    assert c["p_wilcoxon"] == pytest.approx(2 / 32)  # exact: all 5 signs positive
    same = paired(fake_rows(), "wsl", "ce", "r8")
    assert same["p_ttest"] == 1.0 and same["p_wilcoxon"] == 1.0 and same["ties"] == 5
    assert paired(fake_rows(), "kd", "ce", "other-student") is None
    two = fake_rows() + [{**r, "student": "r14"} for r in fake_rows()[:5]]
    assert [(x["student"], x["variant"]) for x in summarize(two[5:] + two[:5])] == [
        ("r8", "kd"), ("r8", "wsl"), ("r8", "ce"), ("r14", "ce")
    ]  # fmt: skip
    comps = comparisons(fake_rows(), "ce", [("kd", "wsl")])
    assert [(x["a"], x["b"]) for x in comps] == [("kd", "ce"), ("wsl", "ce"), ("kd", "wsl")]


def test_report_files(tmp_path):
    r = write_report(fake_rows(), tmp_path, "rep", "ce", [])
    md = (tmp_path / "rep.md").read_text()
    assert "| r8 | ce | 5 | 0.8400 ± 0.0316 | 0.8000 | 0.8800 |" in md
    assert "| r8 | kd − ce | 5 | +0.0300 | 5 / 0 / 5 | 0.013 | 0.062 |" in md
    with open(tmp_path / "rep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [x["variant"] for x in rows] == ["ce", "kd", "wsl"]
    assert len((tmp_path / "rep_runs.csv").read_text().splitlines()) == 1 + 16
    assert (tmp_path / "rep.png").read_bytes()[:4] == b"\x89PNG"
    assert r["runs"] == 16


def test_parsers_and_plan_errors(tmp_path):
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    for bad in ("x", "-1", ""):
        with pytest.raises(KdcacheError, match="--seeds"):
            parse_seeds(bad)
    assert parse_grid(["T=2,4", "kd:alpha=0.5"]) == {"*": {"T": [2, 4]}, "kd": {"alpha": [0.5]}}
    spec = StudySpec(str(tmp_path), ["ce", "lsr"], [0, 1], hparam_grid=parse_grid(["eps=0,0.2"]))
    runs = plan(spec)
    assert [r.variant for r in runs[:2]] == ["ce", "ce"]
    assert {r.variant for r in runs} == {"ce", "lsr[eps=0]", "lsr[eps=0.2]"}
    assert len(runs) == 6
    with pytest.raises(KdcacheError, match="needs teacher logits"):
        plan(StudySpec(str(tmp_path), ["kd"], [0]))
    with pytest.raises(KdcacheError, match=r"eps=2 .*\[0, 1\]"):
        plan(StudySpec(str(tmp_path), ["lsr"], [0], hparam_grid=parse_grid(["eps=2"])))
    with pytest.raises(KdcacheError, match="unknown loss 'nope'"):
        plan(StudySpec(str(tmp_path), ["nope"], [0]))
    own = StudySpec(str(tmp_path), ["ce", "tfkd-self"], [0], cache="t.zarr",
                    loss_cache={"tfkd-self": "self.zarr"})  # fmt: skip
    assert [run_config(own, r)["caches"] for r in plan(own)] == [["t.zarr"], ["self.zarr"]]
    with pytest.raises(KdcacheError, match="--loss-cache names loss 'kd'"):
        plan(StudySpec(str(tmp_path), ["ce"], [0], loss_cache={"kd": "x"}))


def test_resume_skips_finished_runs(tmp_path, monkeypatch):
    launched = []

    def fake_launch(r, cfg, threads):
        launched.append((r.variant, r.seed))
        r.dir.mkdir(parents=True, exist_ok=True)
        (r.dir / "run.json").write_text(json.dumps(cfg))
        if not (r.variant == "lsr" and r.seed == 1 and len(launched) < 5):  # first try dies
            acc = 0.9 if r.variant == "lsr" else 0.8
            (r.dir / "result.json").write_text(json.dumps({"test_acc": acc + r.seed / 100}))
        return r, 0

    monkeypatch.setattr(study_mod, "_launch", fake_launch)
    spec = StudySpec(str(tmp_path), ["ce", "lsr"], [0, 1], jobs=1, distill={"epochs": 1})
    with pytest.raises(KdcacheError, match="1 of 4 runs failed"):
        run_study(spec)
    assert len(launched) == 4
    r = run_study(spec)  # only the run without a result is trained again
    assert launched[4:] == [("lsr", 1)] and r["runs"] == 4
    assert r["comparisons"][0]["wins"] == 2
    launched.clear()
    assert run_study(spec)["trained"] == 0 and launched == []
    with pytest.raises(KdcacheError, match="--compare 'kd' is not a variant.*ce, lsr"):
        run_study(StudySpec(str(tmp_path), ["ce", "lsr"], [0, 1], compare=[("kd", "ce")]))
    spec.distill = {"epochs": 2}
    with pytest.raises(KdcacheError, match="epochs differ"):
        run_study(spec)
    spec.distill = {"epochs": 1}
    assert run_study(spec)["trained"] == 0  # same again: resumable
    stored = tmp_path / "runs/resnet8/ce/seed0/run.json"
    old = json.loads(stored.read_text())
    stored.write_text(json.dumps({k: v for k, v in old.items() if k != "mixup_mode"}))
    assert run_study(spec)["trained"] == 0  # an option added since, at its default: still done
    stored.write_text(json.dumps({**old, "mixup_mode": "elem"}))
    with pytest.raises(KdcacheError, match="ce/seed0 was planned with other settings .mixup_mode"):
        run_study(spec)
    stored.write_text(json.dumps(old))
    from kdcache.distill.losses import LOSSES

    changed = dataclasses.replace(LOSSES["lsr"], defaults={"eps": 0.2})
    monkeypatch.setitem(LOSSES, "lsr", changed)  # a new default: old lsr results are stale
    with pytest.raises(KdcacheError, match="lsr/seed0 was planned with other settings.*hparams"):
        run_study(spec)


def test_study_cli_end_to_end(tmp_path):
    """Two teacher-free losses x one seed of real (tiny) training through the CLI."""
    out = tmp_path / "st"
    args = ["study", "--losses", "ce,lsr", "--seeds", "0", "--epochs", "1", "--out", out,
            "--set", "max_samples=32", "--jobs", "2"]  # fmt: skip
    res = cli(*args)
    assert "| resnet8 | lsr − ce | 1 |" in res.output
    result = json.loads((out / "runs/resnet8/lsr/seed0/result.json").read_text())
    assert set(result) >= {"epoch", "test_acc", "wall_s"} and result["epoch"] == 0
    assert (out / "study.png").exists()
    again = cli(*args)
    assert again.stdout == res.stdout  # nothing retrained, the same report
    bad = cli("study", "--losses", "lsr-os-tc", "--hparam", "c=0.99,2", "--out", tmp_path / "x",
              ok=False)  # fmt: skip
    assert bad.exit_code == 2 and bad.output.startswith("error: --hparam") and "c=2" in bad.output
    assert not (tmp_path / "x").exists()
