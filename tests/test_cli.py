"""The CLI layer: instant --help (no heavy imports), option parsing, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.clitools import ROOT, cli


def test_help_imports_no_torch():
    code = (
        "import sys; from click.testing import CliRunner; from cli import main;"
        "r = CliRunner().invoke(main, ['precompute', '--help']);"
        "assert r.exit_code == 0 and '--num-augs' in r.output;"
        "r = CliRunner().invoke(main, ['distill', '--help']);"
        "assert '[default: 240]' in r.output;"
        "print(sorted(m for m in ('torch', 'zarr', 'h5py', 'timm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_bad_option_values_are_refused():
    res = cli("distill", "--student", "resnet8", "--hparam", "novalue", ok=False)
    assert res.exit_code == 2 and "NAME=VALUE" in res.output
    res = cli("distill", "--student", "resnet8", "--milestones", "a,b", ok=False)
    assert res.exit_code == 2 and "--milestones" in res.output
    res = cli("cache", "info", "x.zarr", "--storage-options", "{bad", ok=False)
    assert res.exit_code == 2 and "not JSON" in res.output


def test_cache_info_json_and_missing_path(tmp_path):
    res = cli("cache", "info", tmp_path / "nope.zarr", ok=False)
    assert res.exit_code == 2 and res.stderr.startswith("error: ")
    out = tmp_path / "c.zarr"
    cli(
        "precompute",
        "--teacher",
        "resnet8",
        "--random-init",
        "--dataset",
        "digits",
        "--max-samples",
        "10",
        "--num-augs",
        "2",
        "--out",
        out,
    )
    d = json.loads(cli("cache", "info", out, "--json").stdout)
    assert (d["n"], d["num_augs"], d["num_classes"], d["complete"]) == (10, 2, 10, True)
    assert d["spec"]["views"]["policy"] == "crop-flip" and len(d["key"]) == 64
    text = cli("cache", "info", out).stdout
    assert d["key"] in text


def _one_line_error(res, *needles: str) -> None:
    """Exit 2 and exactly one stderr line `error: ...` containing every needle."""
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_version():
    from importlib.metadata import version

    assert cli("--version").stdout.strip() == f"kdcache {version('kdcache')}"


def test_click_usage_errors_are_one_line():
    _one_line_error(cli("distill", "--studnt", "x", ok=False), "--studnt", "--student")
    _one_line_error(cli("distill", ok=False), "Missing option '--student'")
    _one_line_error(cli("distill", "--student", "r", "--epochs", "x", ok=False), "'--epochs'")
    _one_line_error(cli("cache", "info", ok=False), "PATH")
    _one_line_error(cli("nope", ok=False), "nope")


def test_out_of_range_values_name_the_option_and_write_nothing(tmp_path):
    out = tmp_path / "run"
    for opt, bad, expected in (
        ("--lr", "-0.1", "x>0"),
        ("--lr", "0", "x>0"),
        ("--momentum", "-0.5", "0<=x<=1"),
        ("--weight-decay", "-1e-4", "x>=0"),
        ("--max-steps", "-3", "x>=1"),
        ("--max-samples", "-5", "x>=1"),
        ("--image-size", "0", "x>=1"),
    ):
        res = cli("distill", "--student", "resnet8", opt, bad, "--out", out, ok=False)
        _one_line_error(res, f"'{opt}'", expected)
    res = cli("precompute", "--teacher", "resnet8", "--image-size", "0", "--out", out, ok=False)
    _one_line_error(res, "'--image-size'", "x>=1")
    res = cli("evaluate", "--weights", __file__, "--image-size", "0", ok=False)
    _one_line_error(res, "'--image-size'")
    assert list(tmp_path.iterdir()) == []


def test_path_options_are_checked(tmp_path):
    for cmd in (["distill", "--student", "resnet8"], ["precompute", "--teacher", "resnet8"]):
        res = cli(*cmd, "--weights", tmp_path, "--out", tmp_path / "o.zarr", ok=False)
        _one_line_error(res, "'--weights'", "is a directory", "expected a weights file")
    res = cli("evaluate", "--weights", tmp_path / "none.pt", ok=False)
    _one_line_error(res, "'--weights'", "does not exist")
    (tmp_path / "old.pt").write_bytes(b"x")
    for out in ("model.pt", tmp_path / "old.pt", "x/best.pth"):
        res = cli("distill", "--student", "resnet8", "--out", out, ok=False)
        _one_line_error(res, "'--out'", "expected the run directory")
    for out in ("teacher.pt", tmp_path / "old.pt"):
        res = cli("precompute", "--teacher", "resnet8", "--out", out, ok=False)
        _one_line_error(res, "'--out'", "expected PATH.zarr, PATH.h5/.hdf5 or a root directory")
    assert not (tmp_path / "o.zarr").exists() and not (ROOT / "model.pt").exists()
    assert not (ROOT / "teacher.pt").exists()
    res = cli("cache", "merge", tmp_path / "m.zarr", "a.zarr", "./a.zarr", ok=False)
    _one_line_error(res, "'./a.zarr' is given twice", "distinct")
    res = cli("cache", "merge", "a.zarr", "a.zarr", "b.zarr", ok=False)
    _one_line_error(res, "also an input")


def test_library_errors_name_real_options(tmp_path, make_text_file):
    res = cli("precompute", "--teacher", "resnet8", "--dataset", "imagefolder",
              "--out", tmp_path / "c.zarr", ok=False)  # fmt: skip
    _one_line_error(res, "--data-root DIR")
    res = cli("precompute", "--teacher", "hf:/missing/bert-dir", "--dataset", "text",
              "--data-root", make_text_file(), "--out", tmp_path / "c.zarr", ok=False)  # fmt: skip
    _one_line_error(res, "'/missing/bert-dir' does not exist", "save_pretrained")
    c = tmp_path / "c.zarr"
    args = ["--teacher", "resnet8", "--random-init", "--max-samples", "12", "--num-augs", "1",
            "--out", c]  # fmt: skip
    cli("precompute", *args)
    res = cli("precompute", *args[:-3], "2", "--out", c, ok=False)
    _one_line_error(res, "different spec", "pass --overwrite")
    assert "overwrite=True" not in res.stderr


def test_resume_with_a_garbage_checkpoint(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_text("not a checkpoint")
    res = cli("distill", "--student", "resnet8", "--max-samples", "16", "--epochs", "1",
              "--test-split", "none", "--out", out, "--resume", ok=False)  # fmt: skip
    _one_line_error(res, "--resume", "last.pt", "not a readable kdcache checkpoint")
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"]


def test_forgotten_dataset_names_the_caches_dataset(tmp_path, make_cifar):
    root = make_cifar("cifar10", n_train=20, n_test=10)
    c = tmp_path / "c.zarr"
    cli("precompute", "--teacher", "resnet8", "--random-init", "--dataset", "cifar10",
        "--data-root", root, "--num-augs", "1", "--out", c)  # fmt: skip
    res = cli("distill", "--student", "resnet8", "--loss", "kd", "--cache", c,
              "--out", tmp_path / "r", ok=False)  # fmt: skip
    _one_line_error(res, "computed on cifar10/train", "digits/train", "--dataset cifar10")
    assert not (tmp_path / "r").exists()


def test_evaluate_defaults_from_checkpoint_top5_json_per_class(tmp_path, make_imagefolder):
    root = make_imagefolder(n_per_class=4, classes=("ant", "bee", "cat"), size=(20, 16))
    run = tmp_path / "run"
    cli("distill", "--student", "resnet8", "--dataset", "imagefolder", "--data-root", root,
        "--test-split", "train", "--epochs", "1", "--batch-size", "4", "--out", run)  # fmt: skip
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    # no --model/--dataset/--data-root: the checkpoint's (before: --model required; then
    # the digits default on a 3-class model was an IndexError traceback)
    res = cli("evaluate", "--weights", run / "best.pt", "--split", "train", "--json",
              "--per-class")  # fmt: skip
    d = json.loads(res.stdout)
    assert (d["model"], d["dataset"], d["data_root"], d["n"]) == ("resnet8", "imagefolder",
                                                                  str(root), 12)  # fmt: skip
    assert d["from_checkpoint"] == ["data_root", "dataset", "model"]
    assert d["top1"] == pytest.approx(rec["test_acc"], abs=1e-6)
    assert d["loss"] == pytest.approx(rec["test_loss"], abs=1e-4)
    assert d["top5"] == 1.0  # 3 classes: the true one is always among the top 5
    rows = d["per_class"]
    assert [(r["name"], r["n"]) for r in rows] == [("ant", 4), ("bee", 4), ("cat", 4)]
    assert sum(r["top1"] * r["n"] for r in rows) == pytest.approx(d["top1"] * 12)
    text = cli("evaluate", "--weights", run / "best.pt", "--split", "train", "--per-class").stdout
    assert "top-1" in text and "top-5 1.0000" in text and "loss" in text and "\nbee " in text

    res = cli("evaluate", "--weights", run / "best.pt", "--dataset", "digits", ok=False)
    _one_line_error(res, "3 classes", "digits/test", "--dataset")
    import torch

    sd = torch.load(run / "best.pt", weights_only=True)["model"]
    torch.save(sd, tmp_path / "plain.pt")
    res = cli("evaluate", "--weights", tmp_path / "plain.pt", ok=False)
    _one_line_error(res, "--model is required")


def test_evaluate_takes_the_view_size_of_an_rrc_flip_cache(tmp_path):
    c = tmp_path / "c.zarr"
    cli("precompute", "--teacher", "resnet8", "--random-init", "--max-samples", "16",
        "--num-augs", "1", "--augment", "rrc-flip", "--image-size", "24", "--out", c)  # fmt: skip
    run = tmp_path / "run"
    cli("distill", "--student", "resnet8", "--cache", c, "--loss", "kd", "--max-samples", "16",
        "--epochs", "1", "--batch-size", "8", "--out", run)  # fmt: skip
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    d = json.loads(cli("evaluate", "--weights", run / "best.pt", "--json").stdout)
    assert d["image_size"] == 24 and "image_size" in d["from_checkpoint"]
    assert d["top1"] == pytest.approx(rec["test_acc"], abs=1e-6)
