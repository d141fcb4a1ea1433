"""`--config FILE.yaml` on every command: file < flags, unknown keys refused, and the
resolved config each run writes repeats that run exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from tests.clitools import cli

TINY = ["--max-samples", "48", "--batch-size", "16", "--test-split", "none"]


def _records(run) -> list[dict]:
    skip = {"epoch_seconds", "samples_per_s"}
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in skip} for x in lines]


def test_distill_config_file_flags_override_and_repeat(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "student: resnet8\nloss: lsr\nhparam: {eps: 0.2}\nepochs: 5\nschedule: step\n"
        "milestones: [1]\nlr: 0.1\nmax-samples: 48\nbatch_size: 16\ntest_split: none\n"
    )
    a = tmp_path / "a"
    cli("distill", "--config", cfg, "--epochs", "2", "--out", a)
    resolved = yaml.safe_load((a / "config.yaml").read_text())
    # the flag beat the file; the file beat the defaults; defaults are filled in
    assert resolved["epochs"] == 2 and resolved["lr"] == 0.1 and resolved["loss"] == "lsr"
    assert resolved["hparam"] == ["eps=0.2"] and resolved["milestones"] == "1"
    assert resolved["momentum"] == 0.9 and resolved["out"] == str(a)
    assert "resume" not in resolved
    ck = torch.load(a / "last.pt", weights_only=True)
    assert ck["config"]["hparams"] == {"eps": 0.2} and ck["config"]["milestones"] == [1]
    assert len(_records(a)) == 2 and _records(a)[1]["lr"] == pytest.approx(0.01)

    b = tmp_path / "b"
    cli("distill", "--config", a / "config.yaml", "--out", b)
    assert _records(a) == _records(b)
    ka, kb = ck["model"], torch.load(b / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(ka[k], kb[k]) for k in ka)


def test_unknown_and_bad_config_keys_are_one_line_errors(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("student: resnet8\nlrr: 3\nwhatever: 1\n")
    res = cli("distill", "--config", cfg, "--out", tmp_path / "r", ok=False)
    assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1
    assert res.stderr.startswith("error: --config") and "'lrr' (did you mean 'lr'?)" in res.stderr
    assert "'whatever'" in res.stderr and not (tmp_path / "r").exists()

    cfg.write_text("student: resnet8\nepochs: many\n")
    res = cli("distill", "--config", cfg, "--out", tmp_path / "r", ok=False)
    assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1
    assert "'--epochs'" in res.stderr and "many" in res.stderr

    for text, says in (("- a\n- b\n", "holds a list"), ("a: [\n", "not valid YAML")):
        cfg.write_text(text)
        res = cli("cache", "info", "x.zarr", "--config", cfg, ok=False)
        assert res.exit_code == 2 and says in res.stderr and len(res.stderr.splitlines()) == 1
    res = cli("evaluate", "--config", tmp_path / "missing.yaml", "--weights", cfg, ok=False)
    assert res.exit_code == 2 and "cannot read" in res.stderr and "--config" in res.stderr


def test_precompute_config_next_to_cache_repeats_bit_identically(tmp_path):
    from kdcache.models.factory import create_model

    torch.manual_seed(0)
    weights = tmp_path / "t.pt"
    torch.save(create_model("resnet8", num_classes=10)[0].state_dict(), weights)
    out = tmp_path / "c.zarr"
    cli("precompute", "--teacher", "resnet8", "--weights", weights, "--max-samples", "20",
        "--num-augs", "2", "--chunk-samples", "8", "--seed", "3", "--out", out)  # fmt: skip
    conf = tmp_path / "c.zarr.config.yaml"
    resolved = yaml.safe_load(conf.read_text())
    assert resolved["seed"] == 3 and resolved["num_augs"] == 2 and resolved["format"] is None
    assert "overwrite" not in resolved and "break_lock" not in resolved
    again = tmp_path / "d.zarr"
    cli("precompute", "--config", conf, "--out", again)
    a = json.loads(cli("cache", "info", out, "--json").stdout)
    b = json.loads(cli("cache", "info", again, "--json").stdout)
    assert a["key"] == b["key"] and b["complete"]
    import zarr

    la, lb = zarr.open_group(str(out), mode="r"), zarr.open_group(str(again), mode="r")
    assert np.array_equal(la["logits"][:], lb["logits"][:])

    # a cache subcommand reads its options from a file too
    (tmp_path / "info.yaml").write_text("json: true\n")
    d = json.loads(cli("cache", "info", out, "--config", tmp_path / "info.yaml").stdout)
    assert d["key"] == a["key"]


def test_precompute_bad_input_leaves_no_config(tmp_path):
    res = cli("precompute", "--teacher", "nope-model", "--out", tmp_path / "c.zarr", ok=False)
    assert res.exit_code == 2 and res.stderr.startswith("error: ")
    assert list(tmp_path.iterdir()) == []
    res = cli("precompute", "--teacher", "resnet8", "--max-samples", "-3", "--out",
              tmp_path / "c.zarr", ok=False)  # fmt: skip
    assert res.exit_code == 2 and "'--max-samples'" in res.stderr and "x>=1" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_config_value_shapes_convert():
    import click
    from kdcache.cli import distill
    from kdcache.cliconfig import read_config

    p = {x.name: x for x in distill.params}
    assert isinstance(p["hparams" if "hparams" in p else "hparam"], click.Option)
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write("cache: a.zarr\nstorage-options: {anon: true}\nmilestones: [3, 4]\nplots: false\n")
    m = read_config(f.name, distill)
    assert m["caches"] == ["a.zarr"] and json.loads(m["storage_options"]) == {"anon": True}
    assert m["milestones"] == "3,4" and m["plots"] is False
