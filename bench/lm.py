"""Token-cache stage 1: precompute tokens/s vs the teacher's bare forward on the same
batches, and peak RSS at 1x vs 16x corpus. Not a test; prints one table.

    .venv/bin/python bench/lm.py [--rows 256] [--layers 4] [--embd 256] [--vocab 8192]
        [--max-length 128] [--topk 64] [--batch-size 8] [--threads 2] [--repeats 3]

Rows:
  bare forward     the teacher's forward (logits left where they are) on the very batches
                   stage 1 builds (chunk-local, sorted by length, padded to the longest)
  precompute loop  precompute.lm._compute: forward + fp32 log_softmax + top-k + tail on the
                   device + host packing + cache writes
  precompute e2e   run_lm end to end (model load, tokenize pass, cache create, finalize)
RSS: peak resident memory of a whole precompute process (fresh interpreter) at 1x and 16x
--rss-rows corpus rows; the goal is within 10 %.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL = 0.90


def make_teacher(d: Path, args) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.lmtools import make_tokenizer

    d.mkdir(parents=True, exist_ok=True)
    make_tokenizer(d, vocab_size=min(args.vocab, 1000))
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.max_length, n_embd=args.embd,
                     n_layer=args.layers, n_head=4, bos_token_id=0, eos_token_id=0)  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(d)
    return d


def config(teacher: Path, corpus: Path, out: Path, args):
    from kdcache.precompute.config import PrecomputeConfig

    return PrecomputeConfig(
        teacher=f"hf:{teacher}", out=str(out), dataset="text", data_root=str(corpus),
        max_length=args.max_length, topk=args.topk, batch_size=args.batch_size,
        chunk_samples=args.chunk_samples, device="cpu", overwrite=True,
    )  # fmt: skip


def bare_forward(cfg, args) -> float:
    """Seconds of the teacher's forward over stage 1's batches (tokens/s computed by caller)."""
    import numpy as np
    import torch
    from kdcache.data.lmtext import iter_rows, tokenize_corpus
    from kdcache.models.lm import load_causal_lm

    net, tok, info = load_causal_lm(cfg.teacher)
    corpus = tokenize_corpus(iter_rows("text", cfg.data_root, "train"), tok, cfg.max_length,
                             info["vocab_size"])  # fmt: skip
    batches = []
    for lo in range(0, len(corpus), cfg.chunk_samples):
        hi = min(lo + cfg.chunk_samples, len(corpus))
        lengths = corpus.lengths[lo:hi]
        order = np.argsort(-lengths, kind="stable")
        for b0 in range(0, len(order), cfg.batch_size):
            rows = order[b0 : b0 + cfg.batch_size]
            x = torch.zeros((len(rows), int(lengths[rows].max())), dtype=torch.long)
            att = torch.zeros_like(x)
            for j, r in enumerate(rows):
                ids, _ = corpus.sample(lo + int(r))
                x[j, : len(ids)] = torch.from_numpy(ids)
                att[j, : len(ids)] = 1
            batches.append((x, att))
    n_tok = corpus.n_tokens
    corpus.close()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x, att in batches:
            net(input_ids=x, attention_mask=att).logits.sum().item()
    return time.perf_counter() - t0, n_tok


def precompute(cfg) -> tuple[float, float, int]:
    import kdcache.precompute.lm as plm

    spent = {}
    orig = plm._compute

    def timed(*a, **kw):
        t0 = time.perf_counter()
        try:
            return orig(*a, **kw)
        finally:
            spent["loop"] = time.perf_counter() - t0

    plm._compute = timed
    t0 = time.perf_counter()
    try:
        s = plm.run_lm(cfg)
    finally:
        plm._compute = orig
    return spent["loop"], time.perf_counter() - t0, s["tokens"]


def rss_child(teacher: Path, corpus: Path, out: Path, args) -> int:
    code = (
        f"import sys, json, resource; sys.path.insert(0, {str(ROOT)!r})\n"
        "from bench.lm import config, precompute\nimport argparse\n"
        "args = argparse.Namespace(**json.loads(sys.argv[1]))\n"
        f"precompute(config({str(teacher)!r}, {str(corpus)!r}, {str(out)!r}, args))\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-c", code, json.dumps(vars(args))], env=env,
                       capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return int(p.stdout.strip().splitlines()[-1]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--chunk-samples", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-rows", type=int, default=16, help="Rows of the 1x memory run.")
    ap.add_argument("--no-rss", action="store_true", help="Skip the 1x/16x memory runs.")
    args = ap.parse_args()
    import torch

    from tests.lmtools import write_corpus

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-lm-") as d:
        d = Path(d)
        teacher = make_teacher(d / "teacher", args)
        corpus = write_corpus(d / "corpus.jsonl", args.rows, min_words=20, max_words=160)
        cfg = config(teacher, corpus, d / "c.zarr", args)
        bare, loop, e2e = [], [], []
        for _ in range(args.repeats):  # interleaved: load drifts hit both alike
            secs, n_tok = bare_forward(cfg, args)
            bare.append(n_tok / secs)
            lsecs, esecs, n_tok = precompute(cfg)
            loop.append(n_tok / lsecs)
            e2e.append(n_tok / esecs)
        rows = [("bare forward", max(bare)), ("precompute loop", max(loop)),
                ("precompute e2e", max(e2e))]  # fmt: skip
        print(f"teacher GPT-2 {args.layers}x{args.embd}, V={args.vocab}, top-{args.topk}, "
              f"{args.rows} rows ({n_tok} tokens), batch {args.batch_size}, "
              f"{args.threads} threads, CPU; load {os.getloadavg()[0]:.2f}")  # fmt: skip
        print(f"{'':18}{'tokens/s':>12}{'x bare':>9}")
        for name, v in rows:
            print(f"{name:18}{v:12.0f}{v / rows[0][1]:9.3f}")
        ratio = rows[1][1] / rows[0][1]
        print(
            f"goal loop >= {GOAL:.2f} x bare: {'met' if ratio >= GOAL else 'NOT met'} ({ratio:.3f})"
        )
        if not args.no_rss:
            small = write_corpus(d / "small.jsonl", args.rss_rows, min_words=20, max_words=160)
            big = write_corpus(d / "big.jsonl", 16 * args.rss_rows, min_words=20, max_words=160)
            r1 = rss_child(teacher, small, d / "r1.zarr", args)
            r16 = rss_child(teacher, big, d / "r16.zarr", args)
            print(
                f"peak RSS  1x {r1 / 2**20:.0f} MiB  16x {r16 / 2**20:.0f} MiB  "
                f"ratio {r16 / r1:.3f} (goal <= 1.10: {'met' if r16 <= 1.1 * r1 else 'NOT met'})"
            )


if __name__ == "__main__":
    main()
