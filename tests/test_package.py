"""The installed distribution: one import name (`kdcache`), a working console script run
from outside the clone, and kdcache usable next to a project's own models/ data/ cache/."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).with_name("kdcache")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def test_wheel_has_one_top_level_name(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a copy of the tracked files: the build writes nothing in the clone
    files = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], ROOT)
    for name in files.stdout.split():
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    res = _run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path)],
        tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    (whl,) = tmp_path.glob("kdcache-*.whl")
    tops = {n.split("/")[0] for n in zipfile.ZipFile(whl).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"kdcache"}
    names = zipfile.ZipFile(whl).namelist()
    assert "kdcache/cache/public.py" in names and "kdcache/data/cached.py" in names
    assert not any(n.startswith(("kdcache/tests/", "kdcache/examples/")) for n in names)


@pytest.mark.skipif(not SCRIPT.exists(), reason="kdcache is not installed in this venv")
def test_console_script_runs_outside_the_clone(tmp_path):
    res = _run([str(SCRIPT), "--version"], tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("kdcache "), res.stderr
    res = _run([str(SCRIPT), "list", "losses"], tmp_path)
    assert res.returncode == 0 and "wsl" in res.stdout, res.stderr
    res = _run([str(SCRIPT), "cache", "info", str(tmp_path / "none.zarr")], tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("error: ")
    made = _run(
        [str(SCRIPT), "precompute", "--teacher", "resnet8", "--random-init", "--dataset",
         "digits", "--max-samples", "8", "--num-augs", "1", "--out", "c.zarr", "--device", "cpu"],
        tmp_path,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    res = _run([str(SCRIPT), "cache", "info", "c.zarr"], tmp_path)
    assert res.returncode == 0 and "8" in res.stdout, res.stderr


def test_import_next_to_a_projects_own_packages(tmp_path):
    for pkg in ("models", "data", "cache"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text(f"OWNER = 'user-{pkg}'\n")
    (tmp_path / "cli.py").write_text("OWNER = 'user-cli'\n")
    code = (
        "import models, data, cache, cli, kdcache\n"
        "assert (models.OWNER, data.OWNER, cache.OWNER, cli.OWNER) == "
        "('user-models', 'user-data', 'user-cache', 'user-cli')\n"
        "loss = kdcache.get_loss('kd')\n"
        "import torch\n"
        "print(float(loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]))) > 0)\n"
        "print(kdcache.open_cache.__module__)\n"
    )
    res = _run([sys.executable, "-c", code], tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "kdcache.cache.public"]
