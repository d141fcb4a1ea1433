"""The CLI layer: instant --help (no heavy imports), option parsing, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

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
