"""The Python face of stage 1: `kdcache.precompute(**options)`, the very code path of the
`kdcache precompute` command (which calls `run_options`), with the CLI's option names in
snake_case and the CLI's defaults (read from the click command itself: one source)."""

from __future__ import annotations

from typing import Any


def run_options(kw: dict) -> dict:
    """The `kdcache precompute` command's body: click-parsed options -> the run's summary
    ({} on torchrun ranks other than 0)."""
    from kdcache.cliconfig import storage_options_dict
    from kdcache.precompute.config import PrecomputeConfig
    from kdcache.precompute.run import run

    kw = dict(kw)
    kw["format"] = kw.pop("fmt")
    kw["storage_options"] = storage_options_dict(kw["storage_options"])
    return run(PrecomputeConfig(**kw))


def precompute(**options: Any) -> str | None:
    """Run the teacher once over seeded views and store its logits, exactly as
    `kdcache precompute` does (`teacher=` and `out=` are required; e.g. `num_augs=8`,
    `storage_options={"endpoint_url": ...}`). Returns the cache path (open it with
    `kdcache.open_cache`); None on torchrun ranks other than 0. Bad or unknown options raise
    KdcacheError with the CLI's one-line message (unknown names list close matches)."""
    from kdcache.cache.errors import KdcacheError
    from kdcache.cliconfig import api_call

    def body(kw: dict, cli_options: dict) -> dict:
        shown = ", ".join(f"{k}={v!r}" for k, v in cli_options.items() if v not in (None, False))
        kw["command"] = f"kdcache.precompute({shown})"
        kw["cli_options"] = cli_options
        return run_options(kw)

    summary = api_call("precompute", options, body)
    if summary and not isinstance(summary, dict):
        raise KdcacheError(f"precompute returned {summary!r}; expected its summary")
    return summary["path"] if summary else None
