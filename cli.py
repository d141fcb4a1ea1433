"""kdcache command line: parses options, builds a config, calls run(). No logic lives here.

Heavy imports (torch, zarr) happen inside the commands so `--help` is instant.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys

import click

if __name__ == "__main__" and "kdcache" not in sys.modules:
    # `python cli.py` from a clone: this folder is the package `kdcache` (as installed), so the
    # clone's own code runs even where another kdcache is installed, or none is.
    import importlib.util
    from pathlib import Path

    _spec = importlib.util.spec_from_file_location(
        "kdcache", Path(__file__).resolve().parent / "__init__.py",
        submodule_search_locations=[str(Path(__file__).resolve().parent)],
    )  # fmt: skip
    sys.modules["kdcache"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["kdcache"])

from kdcache.clicache import cache  # noqa: E402
from kdcache.cliconfig import (  # noqa: E402
    CONTEXT,
    NONNEG,
    NONNEG_INT,
    POS_FLOAT,
    POS_INT,
    SCHEDULES,
    STORAGE_OPTIONS,
    STRONG_OPTIONS,
    Group,
    cache_out,
    parse_hparams,
    resolved_options,
    run_dir,
    shard_option,
    version,
    weights_file,
)


@click.group(cls=Group, context_settings=CONTEXT)
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
@click.option(
    "--version", is_flag=True, is_eager=True, expose_value=False, callback=version,
    help="Print the kdcache version and exit.",
)  # fmt: skip
def main(verbose: bool) -> None:
    """kdcache: run the teacher once, keep its logits, train many students fast."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )


@main.command(context_settings=CONTEXT)
@click.option(
    "--teacher",
    required=True,
    help="resnet34 (timm), tv:NAME, hf:PATH, resnet8..wrn_40_2 (kdcache list models).",
)
@click.option(
    "--dataset",
    default="digits",
    help="cifar10, cifar100, digits, imagefolder, text, hfds:PATH_OR_ID, wds:URL "
    "(kdcache list datasets).",
)
@click.option("--data-root", default=None, help="Dataset directory (or file for text).")
@click.option("--split", default="train", help="Dataset split to run the teacher on.")
@click.option("--download", is_flag=True, help="Let torchvision download the dataset.")
@click.option("--num-augs", default=8, type=int, help="Augmented views per sample (A).")
@click.option(
    "--augment", default="crop-flip", help="View policy (kdcache list views): identity, "
    "crop-flip, rrc-flip, token-mask.",
)  # fmt: skip
@click.option("--identity-view/--no-identity-view", default=True, help="View 0 is the eval view.")
@click.option("--seed", default=0, type=int, help="Base seed of the view parameters.")
@click.option(
    "--out", required=True, callback=cache_out,
    help="Cache path (.zarr/.h5) or a root directory.",
)  # fmt: skip
@click.option(
    "--weights", default=None, callback=weights_file,
    help="State dict or kdcache checkpoint of the teacher.",
)  # fmt: skip
@click.option("--pretrained", is_flag=True, help="Load the library's pretrained weights (hub).")
@click.option(
    "--random-init", default=None, type=int, is_flag=False, flag_value=0, metavar="[SEED]",
    help="Random teacher (tests, smoke runs), initialized from SEED (0 if not given).",
)  # fmt: skip
@click.option("--num-classes", default=None, type=int, help="Classes of the teacher head.")
@click.option("--image-size", default=None, type=POS_INT, help="View output size (rrc-flip).")
@click.option(
    "--max-length",
    default=None,
    type=POS_INT,
    help="Text: truncate to this many tokens, padded per batch [default: model's, <= 128].",
)
@click.option("--mask-prob", default=0.15, type=float, help="token-mask: fraction masked.")
@STRONG_OPTIONS
@click.option(
    "--format",
    "fmt",
    default=None,
    type=click.Choice(["zarr", "hdf5"]),
    help="Store format; default from the --out suffix, else zarr.",
)
@click.option(
    "--dtype",
    default="float16",
    type=click.Choice(["float16", "bfloat16", "float32"]),
    help="Stored logit dtype.",
)
@click.option(
    "--compression",
    default="none",
    type=click.Choice(["none", "zstd", "gzip"]),
    help="Chunk compression.",
)
@click.option("--chunk-samples", default=256, type=int, help="Samples per chunk (unit of work).")
@click.option("--batch-size", default=256, type=int, help="Teacher batch size (<= chunk).")
@click.option(
    "--workers",
    default=0,
    type=int,
    help="DataLoader worker processes decoding samples and cutting views (0: in-process).",
)
@click.option("--image-column", default=None, help="hfds: image column (default: auto-detect).")
@click.option("--text-column", default=None, help="hfds: text column (default: auto-detect).")
@click.option("--label-column", default=None, help="hfds: label column (default: auto-detect).")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N.")
@click.option(
    "--amp/--no-amp", default=True, help="bf16 autocast of the teacher on CUDA (ignored on CPU)."
)
@click.option("--compile", is_flag=True, help="torch.compile the teacher.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache with another spec.")
@click.option("--break-lock", is_flag=True, help="Break a stale writer lock.")
@click.option("--max-samples", default=None, type=POS_INT, help="Use only the first N samples.")
@click.option("--topk", default=None, type=int, help="Store a sparse top-K cache (+ tail mass).")
@click.option(
    "--sampled", default=None, type=int, help="Store K sampled class draws per entry (RS-KD)."
)
@click.option(
    "--top-p", default=None, type=click.FloatRange(0, 1, min_open=True),
    help="Token caches: drop top-k entries past the nucleus P (into the tail).",
)  # fmt: skip
@click.option(
    "--kl-sample", default=0, type=click.IntRange(0),
    help="Token caches: record the mean KL of the stored targets to the dense teacher over "
    "the first N samples (cache info shows it).",
)  # fmt: skip
@click.option(
    "--token-cache", is_flag=True,
    help="Write a token-level cache (implied by an hf: causal-LM teacher; refused otherwise).",
)  # fmt: skip
@click.option(
    "--shard", default=None, metavar="I/N", callback=shard_option,
    help="Compute only chunks c % N == I: a partial cache (same key) for `cache merge`.",
)  # fmt: skip
@STORAGE_OPTIONS
def precompute(**kw) -> None:
    """Stage 1: run the teacher once under seeded views and store its raw logits."""
    from kdcache.precompute.api import run_options
    from kdcache.precompute.run import format_summary

    kw["command"] = shlex.join(sys.argv)
    kw["cli_options"] = resolved_options(click.get_current_context())
    summary = run_options(kw)  # the very function kdcache.precompute() calls
    if summary:  # only rank 0 returns one under torchrun
        click.echo(format_summary(summary))


@main.command(context_settings=CONTEXT)
@click.option("--cache", "caches", multiple=True, help="Cache path/URL; repeat for an ensemble.")
@click.option("--student", required=True, help="Student model name (same factory as teachers).")
@click.option(
    "--loss", default="ce", help="ce, kd, wsl, lsr, tfkd-reg, tfkd-self, lsr-os, lsr-os-tc, "
    "mrkd (kdcache list losses).",
)  # fmt: skip
@click.option("--temperature", "-T", default=None, type=float, help="Loss temperature.")
@click.option("--alpha", default=None, type=float, help="Loss soft-term weight.")
@click.option("--hparam", multiple=True, help="Other loss hyper-parameters, NAME=VALUE.")
@click.option("--dataset", default="digits", help="Dataset the cache was computed on.")
@click.option("--data-root", default=None, help="Dataset directory (or file for text).")
@click.option("--split", default="train", help="Training split.")
@click.option("--test-split", default="test", help="Evaluation split ('none' to skip).")
@click.option("--download", is_flag=True, help="Let torchvision download the dataset.")
@click.option("--num-classes", default=None, type=POS_INT, help="Classes (default: from data).")
@click.option("--pretrained", is_flag=True, help="Start the student from hub weights.")
@click.option("--weights", default=None, callback=weights_file, help="Initial student weights.")
@click.option("--epochs", default=240, type=int, help="Epochs (CIFAR recipe: 240).")
@click.option("--batch-size", default=64, type=int, help="Global batch size.")
@click.option("--lr", default=0.05, type=POS_FLOAT, help="Learning rate.")
@click.option("--momentum", default=0.9, type=click.FloatRange(0, 1), help="SGD momentum.")
@click.option("--weight-decay", default=5e-4, type=NONNEG, help="Weight decay.")
@click.option("--optimizer", default="sgd", type=click.Choice(["sgd", "adamw"]), help="Optimizer.")
@click.option("--schedule", default="step", type=SCHEDULES, help="LR schedule.")
@click.option("--milestones", default="150,180,210", help="Step schedule epochs, comma-separated.")
@click.option("--gamma", default=0.1, type=POS_FLOAT, help="Step schedule factor.")
@click.option(
    "--augment",
    default="crop-flip",
    help="View policy when training without a cache (with one: the cache's).",
)
@click.option(
    "--views",
    default="one",
    help="Per epoch: one random cached view per sample, all views, or K: K views of one "
    "decoded sample per step.",
)
@click.option(
    "--teacher-view",
    default="same",
    type=click.Choice(["same", "mean"]),
    help="Teacher logits of the replayed view, or the mean over all cached views.",
)
@click.option(
    "--ensemble",
    default="mean-logits",
    type=click.Choice(["mean-logits", "mean-probs"]),
    help="How several --cache teachers combine.",
)
@click.option(
    "--memory-budget-gb", default=4.0, type=NONNEG, help="Load caches into RAM up to this."
)
@click.option("--image-size", default=None, type=POS_INT, help="View output size (rrc-flip).")
@click.option(
    "--max-length", default=128, type=POS_INT,
    help="Language-model students without a token cache: tokens per row (a cache: its own).",
)  # fmt: skip
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N.")
@click.option(
    "--amp/--no-amp", default=True, help="bf16 autocast of student (and teacher) on CUDA."
)
@click.option("--compile", is_flag=True, help="torch.compile the student.")
@click.option(
    "--workers",
    default=0,
    type=NONNEG_INT,
    help="DataLoader worker processes replaying views (0: in-process).",
)
@click.option("--image-column", default=None, help="hfds: image column (default: auto-detect).")
@click.option("--text-column", default=None, help="hfds: text column (default: auto-detect).")
@click.option("--label-column", default=None, help="hfds: label column (default: auto-detect).")
@click.option("--seed", default=0, type=int, help="Training seed.")
@click.option("--out", default="runs/distill", callback=run_dir, help="Run directory.")
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt.")
@click.option("--overwrite", is_flag=True, help="Replace the run already in OUT (default: refuse).")
@click.option("--max-samples", default=None, type=POS_INT, help="Use only the first N samples.")
@click.option("--max-steps", default=None, type=POS_INT, help="Stop after N optimizer steps.")
@click.option("--plots/--no-plots", default=True, help="Write PNG plots of the metrics.")
@click.option(
    "--log-every",
    default=0,
    type=int,
    help="Optimizer steps between rows of OUT/steps.jsonl (0: once per epoch).",
)
@click.option("--eval-every", default=1, type=int, help="Evaluate every N epochs (and the last).")
@click.option("--tensorboard", is_flag=True, help="TensorBoard scalars under OUT/tb.")
@click.option("--teacher", default=None, help="Online teacher model (in memory), e.g. resnet34.")
@click.option("--teacher-weights", default=None, help="Weights of the --teacher.")
@click.option(
    "--fill-missing",
    is_flag=True,
    help="Compute the chunks --cache lacks with --teacher, write them back, then train.",
)
@click.option(
    "--warmup-epochs", default=0.0, type=float, help="Linear lr warmup (per step) over N epochs."
)
@click.option("--label-smoothing", default=0.0, type=float, help="Smoothing of the CE term.")
@click.option("--clip-grad", default=None, type=float, help="Clip the gradient norm to this.")
@click.option("--ema", is_flag=True, help="Keep a weight EMA of the student; report its acc.")
@click.option("--ema-decay", default=0.9998, type=float, help="EMA decay (with warmup).")
@click.option("--accum-steps", default=1, type=int, help="Micro-batches per optimizer step.")
@STRONG_OPTIONS
@STORAGE_OPTIONS
def distill(**kw) -> None:
    """Stage 2: train a student from cached teacher logits (or plain CE without a cache)."""
    from kdcache.distill.api import run_options
    from kdcache.distill.train import summary_line

    kw["cli_options"] = resolved_options(click.get_current_context())
    rec = run_options(kw)  # the very function kdcache.distill() calls
    if rec:  # only rank 0 returns a record under torchrun
        click.echo(summary_line(rec, kw["out"]))


CKPT = "the checkpoint's, else "


@main.command(context_settings=CONTEXT)
@click.option("--weights", required=True, callback=weights_file, help="Checkpoint or state dict.")
@click.option(
    "--model", default=None, show_default=CKPT + "required",
    help="Model name (same factory as teachers).",
)  # fmt: skip
@click.option("--dataset", default=None, show_default=CKPT + "digits", help="Dataset.")
@click.option("--data-root", default=None, show_default=CKPT + "none", help="Dataset directory.")
@click.option("--split", default=None, show_default=CKPT + "test", help="Split to evaluate.")
@click.option("--num-classes", default=None, type=POS_INT, help="Classes (default: checkpoint).")
@click.option("--batch-size", default=256, type=POS_INT, help="Batch size.")
@click.option(
    "--image-size", default=None, type=POS_INT, show_default=CKPT + "the model's",
    help="Resize the eval view (rrc-flip runs).",
)  # fmt: skip
@click.option("--device", default="auto", help="auto, cpu, cuda.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--per-class", is_flag=True, help="Also print accuracy and count per class.")
def evaluate(as_json: bool, **kw) -> None:
    """Top-1, top-5 accuracy and mean CE loss of a model on a dataset split (eval view).
    A kdcache checkpoint supplies the model, dataset, data root and image size of its run."""
    from kdcache.distill.evaluate import format_result, run_evaluate

    r = run_evaluate(**kw)
    click.echo(json.dumps(r, indent=2, sort_keys=True) if as_json else format_result(r))


@main.command(name="list", context_settings=CONTEXT)
@click.argument("kind", type=click.Choice(["losses", "models", "datasets", "views"]))
@click.option("--filter", "pattern", default=None, help="Model name pattern, e.g. 'resnet*'.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def list_cmd(kind: str, pattern: str | None, as_json: bool) -> None:
    """What the registries hold: losses (hparams, defaults, domains), model sources (the CIFAR
    zoo; timm/tv: names with --filter), dataset sources, view policies (view_params layout)."""
    from kdcache.distill.listing import entries, format_entries

    rows = entries(kind, pattern)
    click.echo(json.dumps(rows, indent=2, default=str) if as_json else format_entries(kind, rows))


@main.command(context_settings=CONTEXT)
@click.option("--cache", default=None, help="Teacher cache (views + logits); none: teacher-free.")
@click.option("--losses", required=True, help="Comma-separated losses, e.g. ce,kd,wsl.")
@click.option("--loss-cache", multiple=True, help="LOSS=PATH: that loss's own cache (tfkd-self).")
@click.option("--seeds", default="0-9", help="Seeds: 0-9 or 0,1,2.")
@click.option("--students", default="resnet8", help="Comma-separated student models.")
@click.option("--hparam", multiple=True, help="Grid [LOSS:]NAME=V1,V2 (repeatable).")
@click.option(
    "--baseline", default=None, show_default="the first variant of the first loss",
    help="Variant the others are compared against, e.g. ce or kd[T=2,alpha=0.5].",
)  # fmt: skip
@click.option("--compare", default="", help="Extra paired comparisons A:B, comma-separated.")
@click.option("--jobs", default=0, type=int, help="Parallel runs (0: one per core).")
@click.option("--out", required=True, help="Study directory (rerun to resume).")
@click.option("--name", default="study", help="Report file name (OUT/NAME.md/.csv/.png).")
@click.option("--dataset", default="digits", help="Dataset (the cache's).")
@click.option("--data-root", default=None, help="Dataset directory.")
@click.option("--epochs", default=8, type=POS_INT, help="Epochs per run.")
@click.option("--batch-size", default=64, type=POS_INT, help="Batch size.")
@click.option("--lr", default=0.05, type=POS_FLOAT, help="Learning rate.")
@click.option("--weight-decay", default=5e-4, type=NONNEG, help="Weight decay.")
@click.option("--schedule", default="cosine", type=SCHEDULES, help="LR schedule.")
@click.option("--device", default="auto", help="Device of every run: auto, cpu, cuda, cuda:N.")
@click.option("--set", "sets", multiple=True, help="Any other distill field, NAME=JSON.")
def study(**kw) -> None:
    """Train losses x seeds (x grids x students) from one cache, then a paired-test report."""
    from kdcache.distill.study import StudySpec, parse_grid, parse_seeds, run_study

    base = {k: kw.pop(k) for k in ("dataset", "data_root", "epochs", "batch_size", "lr")}
    base.update({k: kw.pop(k) for k in ("weight_decay", "schedule", "device")})
    base.update(parse_hparams(kw.pop("sets")))
    split = lambda v: [x.strip() for x in v.split(",") if x.strip()]  # noqa: E731
    pairs = [tuple(p.split(":", 1)) for p in split(kw.pop("compare"))]
    if any(len(p) != 2 for p in pairs):
        raise click.BadParameter("expected A:B pairs", param_hint="--compare")
    lc = [tuple(p.split("=", 1)) for p in kw.pop("loss_cache")]
    if any(len(p) != 2 for p in lc):
        raise click.BadParameter("expected LOSS=PATH", param_hint="--loss-cache")
    spec = StudySpec(
        out=kw["out"], losses=split(kw["losses"]), seeds=parse_seeds(kw["seeds"]),
        students=split(kw["students"]), cache=kw["cache"], loss_cache=dict(lc),
        hparam_grid=parse_grid(kw["hparam"]),
        baseline=kw["baseline"], compare=pairs, jobs=kw["jobs"], name=kw["name"], distill=base,
    )  # fmt: skip
    r = run_study(spec)
    click.echo(r["markdown"], nl=False)
    click.echo(f"{r['runs']} runs in the report -> {kw['out']}/{kw['name']}.md")


main.add_command(cache)  # kdcache cache info|verify|ls|push|pull|merge|convert

if __name__ == "__main__":
    main()
