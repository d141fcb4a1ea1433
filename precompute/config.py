"""Stage-1 configuration: everything `cli.py precompute` can set, in one dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field

from kdcache.data.strongopts import StrongOptions


def parse_shard(text: str | None) -> tuple[int, int]:
    """`--shard I/N` -> (I, N); (0, 1) without a shard. Shards of one spec share one cache key,
    so team members split a teacher run and `cache merge` joins the partial caches."""
    from kdcache.cache.errors import KdcacheError

    if text is None:
        return 0, 1
    i, sep, n = str(text).partition("/")
    try:
        index, count = int(i), int(n)
    except ValueError:
        index, count = -1, 0
    if not sep or count < 1 or not 0 <= index < count:
        raise KdcacheError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/2 and 1/2")
    return index, count


@dataclass
class PrecomputeConfig(StrongOptions):
    """Options of a precompute run. Only the spec-relevant ones reach the cache key."""

    teacher: str
    out: str
    dataset: str = "digits"
    data_root: str | None = None
    split: str = "train"
    download: bool = False
    num_augs: int = 8
    augment: str = "crop-flip"
    identity_view: bool = True
    seed: int = 0
    weights: str | None = None
    pretrained: bool = False
    random_init: int | None = None  # seed of a random teacher (tests, smoke runs); keyed
    num_classes: int | None = None
    image_size: int | None = None
    max_length: int | None = None
    mask_prob: float = 0.15
    format: str | None = None
    dtype: str = "float16"
    compression: str = "none"
    chunk_samples: int = 256
    batch_size: int = 256
    workers: int = 0
    device: str = "auto"
    amp: bool = True  # bf16 autocast, CUDA only
    compile: bool = False
    overwrite: bool = False
    break_lock: bool = False
    max_samples: int | None = None
    image_column: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    topk: int | None = None
    sampled: int | None = None
    top_p: float | None = None  # token caches: keep the top-k entries inside the nucleus P
    kl_sample: int = 0  # token caches: record mean KL(stored || dense) over the first N samples
    token_cache: bool = False  # demand a token cache (the teacher must be a causal LM)
    shard: str | None = None  # "I/N": only chunks c % N == I (a partial cache); not keyed
    storage_options: dict = field(default_factory=dict)
    command: str | None = None
    # every CLI option as resolved (file, flags, defaults); written to the run's config.yaml
    cli_options: dict = field(default_factory=dict)
