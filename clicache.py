"""`kdcache cache ...`: inspect, check, list, push/pull, merge and convert caches (registered
on cli.py's main group). Parsing only; the work is in `cache/` and `precompute.replay`."""

from __future__ import annotations

import json
import shlex
import sys

import click
from kdcache.cliconfig import CONTEXT, STORAGE_OPTIONS, Group, distinct_inputs, storage_options_dict


@click.group(cls=Group, context_settings=CONTEXT)
def cache() -> None:
    """Inspect, check and share caches (paths or URLs: s3://, https://, file://)."""


@cache.command(context_settings=CONTEXT)
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@STORAGE_OPTIONS
def info(path: str, as_json: bool, storage_options: str | None) -> None:
    """Spec, key, N×A×C, dtype, size, completeness and provenance of a cache."""
    from kdcache.cache.tools import format_info
    from kdcache.cache.tools import info as cache_info

    d = cache_info(path, storage_options=storage_options_dict(storage_options))
    click.echo(json.dumps(d, indent=2, sort_keys=True) if as_json else format_info(d))


@cache.command(context_settings=CONTEXT)
@click.argument("path")
@click.option("--replay", is_flag=True, help="Also recompute the stored view digests.")
@click.option("--data-root", default=None, help="Dataset root for --replay.")
@STORAGE_OPTIONS
def verify(path: str, replay: bool, data_root: str | None, storage_options: str | None) -> None:
    """Check completeness, checksums, NaN/Inf and shapes; exit 1 naming the problem."""
    from kdcache.precompute.replay import run_verify

    problems = run_verify(
        path,
        replay=replay,
        data_root=data_root,
        storage_options=storage_options_dict(storage_options),
    )
    if problems:
        for p in problems:
            click.echo(f"problem: {p}", err=True)
        sys.exit(1)
    click.echo(f"ok: {path}")


BREAK_LOCK = click.option("--break-lock", is_flag=True, help="Break the lock of the output.")
PROGRESS = click.option(
    "--progress/--no-progress", default=True, help="Show a progress bar in bytes (stderr)."
)


@cache.command(name="ls", context_settings=CONTEXT)
@click.argument("url")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@STORAGE_OPTIONS
def ls_cmd(url: str, as_json: bool, storage_options: str | None) -> None:
    """Every cache under a directory or URL prefix: key, teacher, dataset, views, size, state."""
    from kdcache.cache.tools import format_ls, ls

    rows = ls(url, storage_options=storage_options_dict(storage_options))
    click.echo(json.dumps(rows, indent=2, sort_keys=True) if as_json else format_ls(rows))


def _copy(src: str, dst: str, storage_options, break_lock, progress, verify_existing, verb):
    from kdcache.cache.share import copy_cache

    r = copy_cache(
        src, dst, storage_options=storage_options_dict(storage_options), break_lock=break_lock,
        progress=progress, command=shlex.join(sys.argv), verify_existing=verify_existing or None,
    )  # fmt: skip
    state = "complete" if r["complete"] else "incomplete (source is incomplete)"
    click.echo(
        f"{verb} {src} -> {dst}: {r['copied_chunks']} chunks copied, {r['kept_chunks']} "
        f"already there and verified; {state}"
    )


def _copy_command(name: str, doc: str):
    @cache.command(name=name, context_settings=CONTEXT, help=doc)
    @click.argument("src")
    @click.argument("dst")
    @BREAK_LOCK
    @PROGRESS
    @click.option("--verify-existing", is_flag=True, help="Re-read chunks already at a remote DST.")
    @STORAGE_OPTIONS
    def command(src, dst, break_lock, progress, verify_existing, storage_options) -> None:
        _copy(src, dst, storage_options, break_lock, progress, verify_existing, name + "ed")

    return command


_copy_command(
    "push",
    "Copy a cache to shared storage chunk by chunk, verifying checksums; rerun to resume. "
    "Refuses to overwrite a different cache at DST.",
)
_copy_command(
    "pull",
    "Copy a shared cache here chunk by chunk, verifying checksums; rerun to resume or to "
    "repair bad chunks. Refuses to overwrite a different cache at DST.",
)


@cache.command(context_settings=CONTEXT)
@click.argument("out")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
@BREAK_LOCK
@PROGRESS
@STORAGE_OPTIONS
def merge(out, inputs, overwrite, break_lock, progress, storage_options) -> None:
    """Merge shards of one cache into one, or several teachers' caches (same dataset and
    views) into one multi-teacher store that `distill --cache OUT` ensembles."""
    from kdcache.cache.merge import merge as do_merge

    distinct_inputs(out, inputs)

    r = do_merge(
        out, inputs, storage_options=storage_options_dict(storage_options), overwrite=overwrite,
        break_lock=break_lock, progress=progress, command=shlex.join(sys.argv),
    )  # fmt: skip
    what = f"multi-teacher store ({', '.join(map(str, r['teachers']))})"
    click.echo(f"merged {len(inputs)} inputs -> {out}: {what if r['members'] else 'one cache'}")


@cache.command(context_settings=CONTEXT)
@click.argument("src")
@click.argument("dst")
@click.option(
    "--dtype", default=None, type=click.Choice(["float16", "bfloat16", "float32"]),
    help="New stored dtype (default: keep).",
)  # fmt: skip
@click.option("--topk", default=None, type=int, help="Make a top-K sparse cache.")
@click.option("--sampled", default=None, type=int, help="Make a K-draw sampled sparse cache.")
@click.option(
    "--compression", default=None, type=click.Choice(["none", "zstd", "gzip"]),
    help="New chunk compression (default: keep).",
)  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace an existing DST.")
@BREAK_LOCK
@PROGRESS
@STORAGE_OPTIONS
def convert(src, dst, dtype, topk, sampled, compression, overwrite, break_lock, progress,
            storage_options) -> None:  # fmt: skip
    """zarr <-> HDF5 (by the DST suffix; same bytes), dtype or compression change, and
    dense -> sparse (--topk K / --sampled K) with the mean KL at T=1 and T=4 reported."""
    from kdcache.cache.convert import convert as do_convert

    r = do_convert(
        src, dst, dtype=dtype, topk=topk, sampled=sampled, compression=compression,
        storage_options=storage_options_dict(storage_options), break_lock=break_lock,
        overwrite=overwrite, progress=progress, command=shlex.join(sys.argv),
    )  # fmt: skip
    line = (
        f"converted {src} -> {dst}: {r['storage']} {r['dtype']}, {r['entry_bytes']} B per entry "
        f"(source {r['src_entry_bytes']} B)"
    )
    kl = r.get("sparse_kl")
    if kl:
        line += f"; mean KL(dense||sparse) {kl['T1']:.4g} at T=1, {kl['T4']:.4g} at T=4"
    click.echo(line)
