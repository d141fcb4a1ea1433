"""Click plumbing of cli.py: config files, option validators and one-line errors.

`--config FILE.yaml` is added to every command by `Command`: the file's keys are the command's
option names (`data_root` or `data-root`, `cache`, `hparam`, `format`, ...), its values become
click's `default_map`, so a flag given on the command line always wins and every value goes
through the same type conversion and validation as a typed one. Unknown keys are an error
naming them. `resolved_options` is the inverse: every option's final value under the same
keys, which distill/precompute write next to their output so `--config THAT` repeats the run.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from pathlib import Path

import click

# Options that say what to do with existing output, not what the run is: never recorded.
NOT_RECORDED = {"config", "resume", "overwrite", "break_lock"}
_SECRET = re.compile(r"secret|token|password|passwd|credential|^key$", re.I)


def option_key(param: click.Parameter) -> str:
    """The config-file key of an option: its first long name in snake case (`data_root`)."""
    longs = [o for o in getattr(param, "opts", []) if o.startswith("--")]
    return longs[0][2:].replace("-", "_") if longs else param.name


def _keys(command: click.Command) -> dict[str, click.Parameter]:
    """Every spelling a config file may use for each option: key, dashed key, param name."""
    out: dict[str, click.Parameter] = {}
    for p in command.params:
        if p.name in NOT_RECORDED or not isinstance(p, click.Option) or p.is_eager:
            continue
        for k in (option_key(p), p.name):
            out[k] = p
            out[k.replace("_", "-")] = p
    return out


def _to_click(param: click.Parameter, value):
    """A YAML value in the form click parses: lists for repeatable options, `k=v` for dict
    entries of repeatable options (`hparam: {c: 0.3}`), JSON for other dicts
    (`storage_options`), comma-joined lists for single options (`milestones: [150, 180]`)."""
    if param.multiple:
        if isinstance(value, dict):
            return [f"{k}={json.dumps(v)}" for k, v in value.items()]
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return value


def read_config(path: str, command: click.Command) -> dict:
    """FILE.yaml -> default_map for `command`; a bad file or key is a UsageError."""
    import yaml

    hint = f"--config {path}"
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise click.BadParameter(
            f"cannot read {path!r} ({e.strerror}); expected a YAML file", param_hint="--config"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise click.BadParameter(
            f"{path!r} is not valid YAML{where}; expected a mapping of option: value",
            param_hint="--config",
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise click.BadParameter(
            f"{path!r} holds a {type(data).__name__}; expected a mapping of option: value",
            param_hint="--config",
        )
    keys = _keys(command)
    unknown = [str(k) for k in data if str(k) not in keys]
    if unknown:
        names = sorted({option_key(p) for p in keys.values()})
        close = {u: difflib.get_close_matches(u.replace("-", "_"), names, 1) for u in unknown}
        said = ", ".join(
            f"{u!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for u, c in close.items()
        )
        raise click.UsageError(
            f"{hint}: unknown key{'s' if len(unknown) > 1 else ''} {said} for "
            f"`{command.name}`; expected its option names"
        )
    out = {}
    for k, v in data.items():
        if v is not None:
            out[keys[str(k)].name] = _to_click(keys[str(k)], v)
    return out


def _load(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.default_map = {**(ctx.default_map or {}), **read_config(value, ctx.command)}


CONFIG = click.Option(
    ["--config"],
    metavar="FILE.yaml",
    is_eager=True,
    expose_value=False,
    callback=_load,
    help="Read option values from a YAML file (keys: option names); flags override it.",
)


def resolved_options(ctx: click.Context) -> dict:
    """Every option's final value (file, flags and defaults merged) under its config key,
    ready for yaml.safe_dump; credentials in `storage_options` are left out."""
    out = {}
    for p in ctx.command.params:
        if p.name not in ctx.params or p.name in NOT_RECORDED or not isinstance(p, click.Option):
            continue
        v = ctx.params[p.name]
        if isinstance(v, tuple):
            v = list(v)
        if p.name == "storage_options" and v:
            opts = json.loads(v)
            v = json.dumps({k: x for k, x in opts.items() if not _SECRET.search(k)}) or None
        out[option_key(p)] = v
    return out


# --- option validators: the form of a value is checked while parsing, before any work ---


def weights_file(ctx, param, value: str | None) -> str | None:
    """--weights names a file: a directory or a missing path is refused before any work."""
    if value and os.path.isdir(value):
        raise click.BadParameter(
            f"{value!r} is a directory; expected a weights file (a state dict or a kdcache "
            "checkpoint: .pt, .pth, .safetensors)"
        )
    if value and not os.path.exists(value):
        raise click.BadParameter(f"{value!r} does not exist; expected a weights file")
    return value


_FILE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".pkl", ".yaml", ".json"}


def run_dir(ctx, param, value: str) -> str:
    """distill --out is a directory; `--out model.pt` would silently become one."""
    if os.path.isfile(value) or os.path.splitext(value.rstrip("/"))[1].lower() in _FILE_SUFFIXES:
        raise click.BadParameter(
            f"{value!r} is a file name; expected the run directory (it gets last.pt, best.pt, "
            "metrics.jsonl, config.yaml)"
        )
    return value


def cache_out(ctx, param, value: str) -> str:
    """precompute --out is a cache path or a root directory, never e.g. `teacher.pt`."""
    local = "://" not in value or value.startswith("file://")
    path = value.removeprefix("file://").rstrip("/")
    suffix = os.path.splitext(path)[1].lower()
    if suffix in _FILE_SUFFIXES or (local and os.path.isfile(path) and suffix not in _STORES):
        raise click.BadParameter(
            f"{value!r} is not a cache path; expected PATH.zarr, PATH.h5/.hdf5 or a root "
            "directory (caches are then named by content under it)"
        )
    return value


_STORES = {".zarr", ".h5", ".hdf5"}


def shard_option(ctx, param, value: str | None) -> str | None:
    """precompute --shard I/N: its form is checked while parsing, before any work."""
    from kdcache.cache.errors import KdcacheError
    from kdcache.precompute.config import parse_shard

    try:
        parse_shard(value)
    except KdcacheError as e:
        raise click.BadParameter(str(e).partition(": ")[2]) from None
    return value


def version(ctx, param, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        v = installed("kdcache")
    except PackageNotFoundError:
        v = "unknown (not installed; run `pip install -e .`)"
    click.echo(f"kdcache {v}")
    ctx.exit()


def distinct_inputs(out: str, inputs: tuple[str, ...]) -> None:
    """`cache merge OUT A A`: the same input twice (or OUT among them) is refused."""
    seen = {}
    for x in inputs:
        norm = x if "://" in x else os.path.normpath(os.path.abspath(x))
        if norm in seen:
            raise click.BadParameter(
                f"{x!r} is given twice (also as {seen[norm]!r}); expected distinct caches",
                param_hint="INPUTS",
            )
        seen[norm] = x
    if (out if "://" in out else os.path.normpath(os.path.abspath(out))) in seen:
        raise click.BadParameter(f"{out!r} is also an input; expected a new path", param_hint="OUT")


class Command(click.Command):
    """A command with `--config FILE.yaml` (every kdcache command)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(CONFIG)


def one_line(e: click.ClickException) -> str:
    """A click error as one line: its message, then where to look."""
    msg = " ".join(e.format_message().split())
    ctx = getattr(e, "ctx", None)
    if isinstance(e, click.UsageError) and ctx is not None:
        msg += f" (see `{ctx.command_path} --help`)"
    return msg


class Group(click.Group):
    """Every error below becomes ONE stderr line `error: ...` and exit 2: click's usage errors,
    bad values, and KdcacheError raised by the libraries. No usage block, no traceback."""

    command_class = Command
    group_class = type  # subgroups are Groups too

    def invoke(self, ctx: click.Context):
        from kdcache.cache.errors import KdcacheError

        try:
            return super().invoke(ctx)
        except KdcacheError as e:
            raise click.ClickException(str(e)) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as e:
            click.echo(f"error: {one_line(e)}", err=True)
            if not standalone_mode:
                raise
            sys.exit(2)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


def storage_options_dict(value: str | None) -> dict:
    """`--storage-options '{"endpoint_url": ...}'` -> dict for fsspec."""
    if not value:
        return {}
    try:
        opts = json.loads(value)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"{value!r} is not JSON ({e.msg})") from None
    if not isinstance(opts, dict):
        raise click.BadParameter(f"{value!r} must be a JSON object")
    return opts


def parse_hparams(pairs: tuple[str, ...]) -> dict:
    """`--hparam c=0.3` pairs -> {"c": 0.3}; values are parsed as JSON when possible."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise click.BadParameter(f"{pair!r} must look like NAME=VALUE", param_hint="--hparam")
        k, v = pair.split("=", 1)
        try:
            out[k.strip().replace("-", "_")] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip().replace("-", "_")] = v
    return out


STORAGE_OPTIONS = click.option(
    "--storage-options", default=None, help="fsspec storage options as JSON (e.g. endpoint_url)."
)


POS_INT = click.IntRange(min=1)
NONNEG_INT = click.IntRange(min=0)
NONNEG = click.FloatRange(min=0)
POS_FLOAT = click.FloatRange(min=0, min_open=True)
SCHEDULES = click.Choice(["step", "cosine", "constant"])


# --- the Python API's options: the click commands' own params (one source of defaults) ---


def api_call(command: str, options: dict, body):
    """`kdcache.<command>(**options)`: each option goes through the click command's own
    default, type, range and callback exactly as on the command line (as a `--config` file's
    keys do), then `body(params, resolved_options)` runs. Errors are KdcacheError: unknown
    names list close matches; click's bad values keep their one-line message."""
    from kdcache.cache.errors import KdcacheError
    from kdcache.cli import main

    cmd = main.commands[command]
    params = {}
    for p in cmd.params:
        if isinstance(p, click.Option) and not p.is_eager and p.expose_value:
            params[option_key(p)] = params[p.name] = p
    unknown = [str(k) for k in options if str(k) not in params]
    if unknown:
        names = sorted({option_key(p) for p in params.values()})
        said = ", ".join(
            f"{u!r}" + (f" (did you mean {', '.join(map(repr, c))}?)" if c else "")
            for u in unknown
            for c in [difflib.get_close_matches(u.replace("-", "_"), names, 3)]
        )
        plural = "s" * (len(unknown) > 1)
        raise KdcacheError(
            f"kdcache.{command}(): unknown option{plural} {said}; expected the "
            f"`kdcache {command}` options in snake_case"
        )
    defaults = {params[k].name: _to_click(params[k], v) for k, v in options.items()}
    try:
        with cmd.make_context(f"kdcache.{command}()", [], default_map=defaults) as ctx:
            return body(dict(ctx.params), resolved_options(ctx))
    except click.ClickException as e:
        raise KdcacheError(" ".join(e.format_message().split())) from None


_STRONG = [  # timm train.py names (data/strong.py; README "Strong augmentation")
    click.option("--aa", default=None, help="rand-m9-mstd0.5-inc1, trivialaugment, original(r)."),
    click.option(
        "--color-jitter", default=None, type=float, help="Jitter strength (off with --aa)."
    ),
    click.option("--reprob", default=0.0, type=float, help="Random erasing probability."),
    click.option("--remode", default="pixel", help="Random erasing fill: pixel, rand, const."),
    click.option("--recount", default=1, type=int, help="Random erasing: at most this many rects."),
    click.option("--mixup", default=0.0, type=float, help="Mixup alpha (> 0: on; partner row)."),
    click.option("--cutmix", default=0.0, type=float, help="CutMix alpha (> 0: on)."),
    click.option("--mixup-prob", default=1.0, type=float, help="Probability a view mixes."),
    click.option("--mixup-switch-prob", default=0.5, type=float, help="P(CutMix) when both on."),
    click.option(
        "--mixup-mode",
        default=None,
        type=click.Choice(["pair", "elem"]),
        help="Partner: pair (timm pair mode in groups of 16 rows; default with a cache) or "
        "elem (any row; the only mode without a cache).",
    ),  # fmt: skip
]


def STRONG_OPTIONS(f):  # noqa: N802 - used as a decorator, like STORAGE_OPTIONS
    """The strong-augmentation options of precompute and cacheless distill."""
    for opt in reversed(_STRONG):
        f = opt(f)
    return f
