"""`make science-lm`: do students distilled from token caches beat a CE-only student?

Corpus: the docstrings of this Python's standard library (no download), one row per module
file, split BY FILE into train and held-out (sha256 of the file name; deterministic file list).
A byte-level BPE tokenizer is trained on the train split, a small GPT-2 teacher is trained with
plain CE (`kdcache distill` without a cache), cached as top-k 16, top-k 64 and sampled-64, and
a smaller student is trained with CE only and with KD from each cache, several seeds each, all
through the real CLI (`kdcache study` for the students). Paired statistics (same seed = same
init and batch order) on held-out perplexity; the report (Markdown + JSON) also gives each
storage's bytes per token against dense fp16 and Megatron-LM's format (K fp16 log-probs +
17-bit ids). Resumable: rerun the same command; finished steps are skipped.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHES = {"top16": ["--topk", "16"], "top64": ["--topk", "64"], "sampled64": ["--sampled", "64"]}


def cli(*args: str) -> str:
    print("$ python cli.py " + " ".join(args), flush=True)
    p = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT,
                       stdout=subprocess.PIPE, text=True)  # fmt: skip
    print(p.stdout.strip()[-400:], flush=True)
    if p.returncode != 0:
        sys.exit(f"science-lm step failed (exit {p.returncode}): {' '.join(args)}")
    return p.stdout


def docstrings(path: Path) -> str:
    """A module's docstrings (module, classes, functions) in source order."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(
        n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]  # fmt: skip
    docs = [ast.get_docstring(n) for n in nodes]
    return "\n\n".join(d for d in docs if d)


def write_corpus(out: Path, max_files: int) -> dict:
    """train.jsonl / test.jsonl from the stdlib's top-level modules, split by file name."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if not p.name.startswith("_"))[:max_files]
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "test": 0}
    with open(out / "train.jsonl", "w") as tr, open(out / "test.jsonl", "w") as te:
        for p in files:
            text = docstrings(p)
            if len(text) < 200:
                continue
            held = int(hashlib.sha256(p.name.encode()).hexdigest(), 16) % 5 == 0
            (te if held else tr).write(json.dumps({"id": p.stem, "text": text}) + "\n")
            counts["test" if held else "train"] += 1
    return counts


def make_models(out: Path, vocab: int, length: int) -> None:
    """BPE tokenizer trained on the train split; teacher and student configs beside it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, PreTrainedTokenizerFast

    texts = [json.loads(x)["text"] for x in open(out / "corpus" / "train.jsonl")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    eot = "<|endoftext|>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eot, bos_token=eot,
                                   pad_token=eot)  # fmt: skip
    for name, layers, width in (("teacher-init", 2, 96), ("student-init", 1, 32)):
        d = out / name
        GPT2Config(vocab_size=len(fast), n_positions=length, n_embd=width, n_layer=layers,
                   n_head=2, bos_token_id=0, eos_token_id=0).save_pretrained(d)  # fmt: skip
        fast.save_pretrained(d)


def train(out: Path, student: str, run: Path, epochs: int, seed: int, *extra: str) -> dict:
    """The teacher: plain CE training of `student` on the corpus (resumable)."""
    if not (run / "hf").exists():
        cli("distill", "--student", f"hf:{student}", "--dataset", "text", "--data-root",
            str(out / "corpus"), "--epochs", str(epochs), "--batch-size", "16", "--optimizer",
            "adamw", "--lr", "3e-3", "--weight-decay", "0.01", "--schedule", "cosine",
            "--seed", str(seed), "--no-plots", "--out", str(run), "--resume", *extra)  # fmt: skip
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def storage(path: Path, k: int, vocab: int) -> dict:
    from kdcache.cache.tokens import open_token_cache

    with open_token_cache(str(path)) as c:
        stored = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return {
            "bytes_per_token": stored / c.n_tokens,
            "dense_fp16": 2.0 * vocab,
            "megatron": k * (2 + 17 / 8),
            "tokens": c.n_tokens,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/science-lm")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--max-files", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--student-epochs", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=0, help="Runs at once per study (0: per core).")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    if not (out / "student-init" / "config.json").exists():
        print(write_corpus(out / "corpus", a.max_files), flush=True)
        make_models(out, a.vocab, a.max_length)
    L = str(a.max_length)
    teacher = train(out, str(out / "teacher-init"), out / "teacher", a.teacher_epochs, 0,
                    "--max-length", L)  # fmt: skip
    print(f"teacher held-out ppl {teacher['test_ppl']:.3f}", flush=True)
    caches = {}
    for name, opt in CACHES.items():
        caches[name] = out / "caches" / f"{name}.zarr"
        cli("precompute", "--teacher", f"hf:{out / 'teacher' / 'hf'}", "--dataset", "text",
            "--data-root", str(out / "corpus"), "--max-length", L, "--batch-size", "32",
            "--chunk-samples", "64", *opt, "--out", str(caches[name]))  # fmt: skip
    rows = students(out, caches, a, L)
    report(out, rows, caches, teacher, a.vocab)


def students(out: Path, caches: dict, a, length: str) -> list[dict]:
    """The students through `kdcache study`: one study of the CE student (no cache: plain LM
    training on the corpus windows) and one `--losses kd` study per cache. A study per
    (ce, kd) pair would train the same CE student three times; the paired statistics are
    computed on the pooled rows instead (same seed = same init and batch order in every study).
    Each study is resumable on its own (`OUT/studies/VARIANT`)."""
    studies = {"ce": ["--losses", "ce", "--set", f"max_length={length}"]}
    for name, path in caches.items():
        studies[f"kd-{name}"] = ["--losses", "kd", "--cache", str(path)]
    common = ["--students", f"hf:{out / 'student-init'}", "--seeds", f"0-{a.seeds - 1}",
              "--dataset", "text", "--data-root", str(out / "corpus"), "--epochs",
              str(a.student_epochs), "--batch-size", "16", "--lr", "3e-3", "--weight-decay",
              "0.01", "--schedule", "cosine", "--set", 'optimizer="adamw"',
              "--jobs", str(a.jobs)]  # fmt: skip
    rows = []
    for variant, opts in studies.items():
        cli("study", *opts, *common, "--out", str(out / "studies" / variant))
        doc = json.loads((out / "studies" / variant / "study.json").read_text())
        rows += [{**r, "student": "gpt2-1x32", "variant": variant} for r in doc["runs"]]
    return rows


def report(out: Path, rows: list[dict], caches: dict, teacher: dict, vocab: int) -> None:
    from kdcache.distill.study_stats import paired, summarize

    summ = summarize(rows, "test_ppl")
    comps = {s["variant"]: paired(rows, s["variant"], "ce", "gpt2-1x32", "test_ppl")
             for s in summ if s["variant"] != "ce"}  # fmt: skip
    store = {n: storage(p, 64 if "64" in n else 16, vocab) for n, p in caches.items()}
    lines = [f"Teacher (GPT-2 2x96) held-out perplexity: {teacher['test_ppl']:.3f}", "",
             "| method | held-out ppl (mean ± std, n) | Δ vs CE (paired) | wins | p (t-test) "
             "| bytes/token | vs dense fp16 | vs Megatron |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in summ:
        v = s["variant"]
        c = comps.get(v)
        diff = "–" if c is None else f"{c['mean_diff']:+.3f}"
        wins = "–" if c is None else f"{c['wins']}/{c['n']} lower"  # test_ppl: a win is lower
        p = "–" if c is None or math.isnan(c["p_ttest"]) else f"{c['p_ttest']:.3g}"
        st = store.get(v.replace("kd-", ""))
        b = ("–", "–", "–") if st is None else (
            f"{st['bytes_per_token']:.1f}", f"{st['bytes_per_token'] / st['dense_fp16']:.4f}x",
            f"{st['bytes_per_token'] / st['megatron']:.2f}x")  # fmt: skip
        lines.append(f"| {v} | {s['mean']:.3f} ± {s['std']:.3f} (n={s['n']}) | {diff} | {wins} "
                     f"| {p} | {b[0]} | {b[1]} | {b[2]} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(
        json.dumps({"summary": summ, "paired": comps, "storage": store, "rows": rows}, indent=1)
    )
    print(text, flush=True)


if __name__ == "__main__":
    main()
