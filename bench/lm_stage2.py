"""Stage 2 on token caches: does reading the cache keep up with the student? (issue 19 item 5)

Builds a tiny GPT-2 teacher (tests/lmtools.py), caches a corpus as top-k 64, then measures in
one run: (a) tokens/s of reading + batching (CacheRows.fetch + collate) in RAM and streamed
from the store (memory budget 0), and (b) the student's training tokens/s (forward, sparse-KL
loss, backward, AdamW step) on the same batches. Goal: reading >= 10x training.

    python bench/lm_stage2.py [--rows 400] [--batch 16] [--width 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    import numpy as np
    import torch
    from kdcache.cache.tokens import open_token_cache
    from kdcache.distill.lmdata import CacheRows, collate, epoch_order, rank_batches
    from kdcache.distill.lmloss import get_lm_loss
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.clitools import cli
    from tests.lmtools import make_teacher, write_corpus

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--width", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        teacher = make_teacher(d / "teacher", n_positions=128)
        write_corpus(d / "data" / "train.jsonl", a.rows, max_words=120)
        cache = d / "c.zarr"
        cli("precompute", "--teacher", f"hf:{teacher}", "--dataset", "text", "--data-root",
            d / "data", "--max-length", 128, "--topk", 64, "--out", cache)  # fmt: skip
        c = open_token_cache(str(cache))
        order = epoch_order(len(c), 0, 0)
        batches = list(rank_batches(order, a.batch, 0, 1))
        res = {}
        for name, budget in (("read in RAM", 1 << 30), ("read streamed", 0)):
            rows = CacheRows(c, budget)
            t0 = time.perf_counter()
            n = sum(int(collate(rows.fetch(b))["keep"].sum()) for b in batches)
            res[name] = n / (time.perf_counter() - t0)
        rows = CacheRows(c, 1 << 30)
        torch.manual_seed(0)
        net = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=128,
                                         n_embd=a.width, n_layer=2, n_head=2))  # fmt: skip
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        loss_fn = get_lm_loss("kd")
        pre = [collate(rows.fetch(b)) for b in batches]  # training timed without reading
        t0, n = time.perf_counter(), 0
        for b in pre:
            logits = net(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            out = loss_fn(logits[b["keep"]].float(), b["labels"], b["targets"])
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            n += int(b["keep"].sum())
        res["student training"] = n / (time.perf_counter() - t0)
        train = res["student training"]
        print(f"token cache top-64, {c.n_tokens} tokens, batch {a.batch}, student 2x{a.width}")
        print(f"{'step':<20} {'tokens/s':>12} {'x training':>11}")
        for k, v in res.items():
            print(f"{k:<20} {v:>12.0f} {v / train:>10.1f}x")
        c.close()
        assert np.isfinite(train)


if __name__ == "__main__":
    main()
