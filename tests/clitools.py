"""Helpers to run the CLI in-process (CliRunner) or as a real process (SIGKILL, torchrun)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, ok: bool = True):
    """Invoke `cli.py ARGS` in-process; assert the exit code when ok=True."""
    from kdcache.cli import main

    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, f"exit {res.exit_code}: {res.output}"
    return res


def proc_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def cli_proc(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python cli.py ARGS` in a fresh process."""
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *map(str, args)],
        cwd=ROOT,
        env=proc_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=N cli.py ARGS` on CPU (gloo), loopback only."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(ROOT / "cli.py"),
        *map(str, args),
    ]
    return subprocess.run(
        cmd, cwd=ROOT, env=proc_env(), capture_output=True, text=True, timeout=timeout
    )
