"""The streaming data layer: peak RSS vs dataset size, text RSS, decode + rrc throughput vs a
bare PIL loop, and precompute end to end vs the teacher's bare forward. Prints a table.

python bench/data.py [--sizes 1000 16000] [--text-n 256000] [--quick]
python bench/data.py --only rss [--rss-sizes 2000 16000]   # memory per image, sampled

`--only rss`: folders of small (32x32) JPEGs, 10 classes; `precompute --teacher resnet8
--random-init --num-augs 2 --augment crop-flip --workers 2 --batch-size 256`, then one
`distill` epoch over that cache, each a fresh process whose RSS (and each worker's) is sampled
every 0.5 s through the run (bench/rss.py); prints MB at each size and kB per extra image
(goal <= 1 kB per image in both stages), and a control: the small set distilled for as many
steps as one epoch of the large one (max and peak of a longer run meet more heap highs).

Each measurement runs in its own process (peak RSS = ru_maxrss of that process; DataLoader
workers are reported separately as the largest child). Data are synthetic smooth JPEGs of
native ~300x200..500x400 (written once under --work), a class-sorted folder of 10 classes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _folder(work: Path, n: int) -> Path:
    from tests.datatools import jpeg_bytes, sizes

    root = work / f"jpegs-{n}"
    if (root / "done").exists():
        return root
    for i, (w, h) in enumerate(sizes(n, seed=1)):
        d = root / "train" / f"c{i * 10 // n}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.jpg").write_bytes(jpeg_bytes(w, h, i))
    (root / "done").write_text("")
    return root


def _small_folder(work: Path, n: int) -> Path:
    """n 32x32 JPEGs in 10 class folders (cheap to make; the per-image cost is bookkeeping)."""
    import numpy as np
    from PIL import Image

    root = work / f"small-{n}"
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / "train" / f"c{i * 10 // n}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((32, 32), Image.BILINEAR).save(d / f"{i:06d}.jpg")
    (root / "done").write_text("")
    return root


def rss_scenario(work: Path, sizes: list[int]) -> None:
    """Stage 1 and one stage-2 epoch at two dataset sizes, RSS sampled through each run."""
    from bench.rss import growth_rows, sample_run

    cli = [sys.executable, str(ROOT / "cli.py")]
    got = {}

    def distill(n: int, epochs: int) -> dict:
        root, out = _small_folder(work, n), work / f"small{n}.zarr"
        return sample_run(cli + ["distill", "--student", "resnet8", "--loss", "kd", "--cache",
                                 str(out), "--dataset", "imagefolder", "--data-root", str(root),
                                 "--test-split", "none", "--epochs", str(epochs),
                                 "--batch-size", "256", "--workers", "2", "--no-plots",
                                 "--overwrite", "--out", str(work / f"small-run{n}")])  # fmt: skip

    for n in sizes:
        root, out = _small_folder(work, n), work / f"small{n}.zarr"
        pre = sample_run(cli + ["precompute", "--teacher", "resnet8", "--random-init",
                                "--dataset", "imagefolder", "--data-root", str(root),
                                "--num-augs", "2", "--augment", "crop-flip", "--workers", "2",
                                "--batch-size", "256", "--out", str(out),
                                "--overwrite"])  # fmt: skip
        got[n] = {"precompute": pre, "distill": distill(n, 1)}
    # control: the small set for as many steps as one epoch of the large one. A longer run
    # meets more heap highs, so max/peak of runs of unequal length mix length with size.
    same_steps = -(-sizes[1] // sizes[0])
    ctrl = distill(sizes[0], same_steps)
    (n0, n1), load = sizes, os.getloadavg()
    print(f"\nRSS per image, 32x32 JPEGs x2 crop-flip views, resnet8, --workers 2, batch 256 "
          f"(load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f})")  # fmt: skip
    print(f"{'stage':<11} {'measure':<31} {f'N={n0} MB':>11} {f'N={n1} MB':>11} {'kB/image':>9}")
    for stage in ("precompute", "distill"):
        r0, r1 = got[n0][stage], got[n1][stage]
        for name, a, b, kb in growth_rows(n0, r0, n1, r1):
            print(f"{stage:<11} {name:<31} {a:>11.1f} {b:>11.1f} {kb:>+9.2f}")
        print(f"{stage:<11} {'seconds':<31} {r0['seconds']:>11} {r1['seconds']:>11}")
    r1 = got[n1]["distill"]
    for k, name in (("busy_max", "main max, equal steps"), ("peak", "main peak, equal steps"),
                    ("steady", "main steady, equal steps")):  # fmt: skip
        kb = (r1[k] - ctrl[k]) * 1024 / (n1 - n0)
        print(f"{'distill':<11} {name:<31} {ctrl[k]:>11.1f} {r1[k]:>11.1f} {kb:>+9.2f}")
    print(f"(equal steps: N={n0} for {same_steps} epochs, {ctrl['seconds']} s, vs N={n1} for 1)")
    print("goal: <= 1 kB per image (main and workers, both stages)")


def _texts(work: Path, n: int) -> Path:
    import numpy as np

    path = work / f"texts-{n}.jsonl"
    if not path.exists():
        rng = np.random.default_rng(0)
        words = "alpha beta gamma delta kappa sigma omega theta lambda zeta".split()
        with open(path, "w") as f:
            for i in range(n):
                text = " ".join(rng.choice(words, size=int(rng.integers(5, 30))))
                f.write(json.dumps({"text": text, "label": i % 3}) + "\n")
    return path


def _tiny_bert(work: Path, texts: Path) -> Path:
    out = work / "tiny_bert"
    if (out / "config.json").exists():
        return out
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    lines = [json.loads(x)["text"] for x, _ in zip(open(texts), range(2000), strict=False)]
    tok.train_from_iterator(
        lines, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials)
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                      sep_token="[SEP]", mask_token="[MASK]").save_pretrained(out)  # fmt: skip
    cfg = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, num_labels=3)  # fmt: skip
    BertForSequenceClassification(cfg).save_pretrained(out)
    return out


def _rss() -> dict:
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"rss_mb": round(me, 1), "worker_rss_mb": round(kids, 1)}


def child(kind: str, args: list[str]) -> dict:
    """One measurement in this (fresh) process."""
    from kdcache.cli import main

    t0 = time.perf_counter()
    if kind in ("precompute", "distill", "text"):
        try:
            main(args, standalone_mode=False)
        except SystemExit:
            pass
        return {"seconds": round(time.perf_counter() - t0, 2), **_rss()}
    if kind == "bare-forward":  # the teacher on pre-made uint8 batches, nothing else
        import torch
        from kdcache.models.factory import create_model

        n, bs = int(args[0]), int(args[1])
        model, _ = create_model(args[2], num_classes=10)
        model.eval()
        x = torch.randint(0, 256, (bs, 3, 224, 224), dtype=torch.uint8)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for _ in range(0, n, bs):
                model(x)
        return {"seconds": round(time.perf_counter() - t0, 2)}
    if kind == "decode":
        return _decode_rates(Path(args[0]))
    raise SystemExit(f"unknown child {kind}")


def _decode_rates(root: Path) -> dict:
    """Images/s of one thread: our decode + rrc view vs a bare PIL open -> resized_crop."""
    import torch
    import torchvision.transforms.functional as TF
    from kdcache.data.datasets import load_dataset
    from kdcache.data.loader import ViewMaker
    from kdcache.data.views import get_policy
    from PIL import Image
    from torchvision.transforms import RandomResizedCrop

    torch.set_num_threads(1)  # as in a DataLoader worker
    ds = load_dataset("imagefolder", root=root)
    maker = ViewMaker(ds, get_policy("rrc-flip", size=224))
    n = len(ds)
    maker.draw(0, 0, 1, False)  # warm-up (imports)
    t0 = time.perf_counter()
    for i in range(n):  # the usual torchvision loop: draw a box on the image, crop, resize
        img = Image.open(root / ds.keys[i]).convert("RGB")
        top, left, h, w = RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
        out = TF.resized_crop(img, top, left, h, w, [224, 224])
        TF.pil_to_tensor(out if i % 2 else TF.hflip(out))
    bare = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(n):
        maker.draw(i, 0, 1, False)
    ours = n / (time.perf_counter() - t0)
    return {"bare_per_s": round(bare, 1), "ours_per_s": round(ours, 1),
            "ratio": round(ours / bare, 3), "n": n}  # fmt: skip


def run_child(kind: str, *args) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--", *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[1000, 16000])
    ap.add_argument("--text-n", type=int, default=256_000)
    ap.add_argument("--teacher", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--work", default=None, help="Folder for the synthetic data (kept).")
    ap.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke run.")
    ap.add_argument("--only", choices=["all", "rss"], default="all")
    ap.add_argument("--rss-sizes", type=int, nargs=2, default=[2000, 16000])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.rest)))
        return
    if a.quick:
        a.sizes, a.text_n = [24, 96], 2000
    work = Path(a.work or tempfile.mkdtemp(prefix="kdcache-bench-data-"))
    if a.only == "rss":
        rss_scenario(work, [24, 96] if a.quick else a.rss_sizes)
        return
    rows = []
    for n in a.sizes:
        root = _folder(work, n)
        out = work / f"c{n}.zarr"
        pre = run_child("precompute", "precompute", "--teacher", a.teacher, "--random-init",
                        "--dataset",
                        "imagefolder", "--data-root", root, "--augment", "rrc-flip",
                        "--num-augs", "1", "--image-size", "224", "--workers", "2",
                        "--batch-size", a.batch_size, "--out", out, "--overwrite")  # fmt: skip
        dis = run_child("distill", "distill", "--student", a.teacher, "--loss", "kd", "--cache",
                        out, "--dataset", "imagefolder", "--data-root", root, "--test-split",
                        "none", "--epochs", "1", "--batch-size", a.batch_size, "--workers", "2",
                        "--no-plots", "--overwrite", "--out", work / f"run{n}")  # fmt: skip
        bare = run_child("bare-forward", n, a.batch_size, a.teacher)
        rows.append((n, pre, dis, bare))
    dec = run_child("decode", _folder(work, a.sizes[0]))
    texts = _texts(work, a.text_n)
    bert = _tiny_bert(work, texts)
    txt = run_child("text", "precompute", "--teacher", f"hf:{bert}", "--dataset", "text",
                    "--data-root", texts, "--augment", "token-mask", "--num-augs", "2",
                    "--max-length", "64", "--batch-size", "256", "--out", work / "t.zarr",
                    "--overwrite")  # fmt: skip
    print(f"\nimage folder, native ~400x300 JPEG -> 224, teacher {a.teacher}, --workers 2")
    print(f"{'N':>7} {'precompute RSS MB':>18} {'worker MB':>10} {'distill RSS MB':>15} "
          f"{'precompute s':>13} {'bare fwd s':>11} {'fwd/precompute':>15}")  # fmt: skip
    for n, pre, dis, bare in rows:
        print(f"{n:>7} {pre['rss_mb']:>18} {pre['worker_rss_mb']:>10} {dis['rss_mb']:>15} "
              f"{pre['seconds']:>13} {bare['seconds']:>11} "
              f"{bare['seconds'] / max(pre['seconds'], 1e-9):>15.3f}")  # fmt: skip
    (n0, p0, d0, _), (n1, p1, d1, _) = rows
    print(
        f"RSS growth {n0} -> {n1}: precompute {p1['rss_mb'] / p0['rss_mb'] - 1:+.1%}, "
        f"distill {d1['rss_mb'] / d0['rss_mb'] - 1:+.1%} (goal <= +10%)"
    )
    print(
        f"\ntext {a.text_n} sentences, token-mask x2, tiny BERT: peak RSS {txt['rss_mb']} MB "
        f"(goal <= 2048), {txt['seconds']} s"
    )
    print(
        f"\ndecode + rrc view, one thread, {dec['n']} files: ours {dec['ours_per_s']}/s, "
        f"bare PIL open -> resized_crop {dec['bare_per_s']}/s, ratio {dec['ratio']} (goal >= 0.8)"
    )
    print(f"\ndata kept in {work}")


if __name__ == "__main__":
    main()
