"""The guarantees of the README's "Guarantees" section for whole runs: precompute and distill
on a full disk, random teachers, killed and rerun distill runs, resume rules, self-contained
text caches. Each test failed before its fix (issue 9); the item number is in its name.
"""

import os

import h5py
import numpy as np
import pytest
from kdcache.cache.store import open_cache
from kdcache.cache.verify import verify

from tests.clitools import cli
from tests.test_guarantees import _dead_pid, edit_spec, err_line, mounted_small_disk
from tests.test_share import same_bytes


@pytest.fixture
def small_disk(tmp_path):
    with mounted_small_disk(tmp_path) as disk:
        yield disk


# -- 6, 10, 11: distill run directories ------------------------------------------------------
TRAIN = ["distill", "--student", "resnet8", "--loss", "ce", "--dataset", "digits",
         "--max-samples", "32", "--batch-size", "16", "--test-split", "none", "--no-plots",
         "--schedule", "cosine", "--device", "cpu"]  # fmt: skip


def _ck(path):
    import torch

    return torch.load(path, weights_only=True)


def test_6_killed_between_last_and_best_resume_rewrites_best(tmp_path, monkeypatch):
    from kdcache.distill import checkpoint

    out = tmp_path / "run"

    def killed(src, dst):
        raise KeyboardInterrupt  # SIGKILL right after last.pt was renamed into place

    monkeypatch.setattr(checkpoint, "_copy_atomic", killed)
    res = cli(*TRAIN, "--epochs", "1", "--out", out, ok=False)
    assert "error: aborted" in res.output  # the CLI's one line for a KeyboardInterrupt
    monkeypatch.undo()
    assert (out / "last.pt").exists() and not (out / "best.pt").exists()
    cli(*TRAIN, "--epochs", "1", "--out", out, "--resume")  # nothing left to train
    last, best = _ck(out / "last.pt"), _ck(out / "best.pt")
    assert best["epoch"] == last["best_epoch"] == 0
    assert all(best["model"][k].equal(v) for k, v in last["model"].items())
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.yaml", "last.pt",
                                                     "metrics.csv", "metrics.jsonl"]  # fmt: skip


def test_10_existing_out_refused_without_resume_overwrite_replaces(tmp_path):
    out = tmp_path / "run"
    cli(*TRAIN, "--epochs", "1", "--out", out)
    before = (out / "metrics.jsonl").read_text()
    line = err_line(cli(*TRAIN, "--epochs", "1", "--out", out, ok=False))
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert (out / "metrics.jsonl").read_text() == before
    cli(*TRAIN, "--epochs", "1", "--out", out, "--overwrite")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # replaced, not appended
    line = err_line(cli(*TRAIN, "--out", out, "--overwrite", "--resume", ok=False))
    assert "exclude each other" in line


def test_11_resume_with_changed_settings_refused_naming_fields(tmp_path):
    out = tmp_path / "run"
    cli(*TRAIN, "--epochs", "2", "--max-steps", "2", "--out", out)  # "killed" after epoch 0
    line = err_line(cli(*TRAIN, "--epochs", "3", "--lr", "0.1", "--batch-size", "8",
                        "--out", out, "--resume", ok=False))  # fmt: skip
    assert "--batch-size 16 -> 8" in line and "--epochs 2 -> 3" in line
    assert "--lr 0.05 -> 0.1" in line and "may change on resume" in line
    train = [a if a != "cosine" else "step" for a in TRAIN]  # was a KeyError traceback
    line = err_line(cli(*train, "--epochs", "2", "--out", out, "--resume", ok=False))
    assert "--schedule 'cosine' -> 'step'" in line
    line = err_line(cli(*TRAIN, "--epochs", "2", "--loss", "lsr", "--out", out, "--resume",
                        ok=False))  # fmt: skip
    assert "--loss 'ce' -> 'lsr'" in line
    cli(*TRAIN, "--epochs", "2", "--workers", "1", "--out", out, "--resume")  # allowed
    assert _ck(out / "last.pt")["epoch"] == 1
    (out / "last.pt").write_bytes(b"garbage")
    line = err_line(cli(*TRAIN, "--epochs", "2", "--out", out, "--resume", ok=False))
    assert "not a readable kdcache checkpoint" in line


def test_2_full_disk_checkpoint_one_error_line_no_temp(tmp_path, monkeypatch):
    """torch.save into a full disk (simulated: torch's own error text, little free space)."""
    import torch
    from kdcache.distill import checkpoint

    out = tmp_path / "run"
    cli(*TRAIN, "--epochs", "2", "--max-steps", "2", "--out", out)
    real_save = torch.save

    def full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 123")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(checkpoint.space, "free_bytes", lambda p: 1000)
    monkeypatch.setattr(checkpoint.space, "require_space", lambda *a, **k: None)
    line = err_line(cli(*TRAIN, "--epochs", "2", "--out", out, "--resume", ok=False))
    assert "no space left" in line and "epoch 0 is kept" in line and "--resume" in line
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.yaml", "last.pt",
                                                     "metrics.csv", "metrics.jsonl"]  # fmt: skip
    assert _ck(out / "last.pt")["epoch"] == 0
    cli(*TRAIN, "--epochs", "2", "--out", out, "--resume")
    assert _ck(out / "last.pt")["epoch"] == 1


# -- 3. random teachers are keyed and reproducible ------------------------------------------
PRE = ["precompute", "--teacher", "resnet8", "--dataset", "digits", "--max-samples", "16",
       "--num-augs", "2", "--chunk-samples", "8"]  # fmt: skip


def test_3_random_teacher_needs_random_init_and_is_reproducible(tmp_path):
    line = err_line(cli(*PRE, "--out", tmp_path / "x.zarr", ok=False))
    assert "has no trained weights" in line and "--random-init" in line
    assert not (tmp_path / "x.zarr").exists()
    a, b, c = (tmp_path / f"{n}.zarr" for n in "abc")
    cli(*PRE, "--random-init", "--out", a)
    cli(*PRE, "--random-init", "--out", b)
    cli(*PRE, "--random-init", "7", "--out", c)
    ca, cb, cc = (open_cache(str(p)) for p in (a, b, c))
    assert ca.spec.teacher["init_seed"] == 0 and cc.spec.teacher["init_seed"] == 7
    assert ca.key == cb.key != cc.key
    assert ca.attrs["checksums"] == cb.attrs["checksums"] != cc.attrs["checksums"]
    assert np.array_equal(ca.read_chunk(0), cb.read_chunk(0))
    assert "random-init seed 7" in cli("cache", "info", c).output
    ls = cli("cache", "ls", tmp_path).output
    assert ls.count("random-init seed 0") == 2 and ls.count("random-init seed 7") == 1
    line = err_line(cli(*PRE, "--random-init", "--pretrained", "--out", a, ok=False))
    assert "exclude each other" in line


def test_3_weights_file_origin_shown(tmp_path):
    import torch
    from kdcache.models.factory import create_model

    model, _ = create_model("resnet8", num_classes=10, init_seed=3)
    torch.save(model.state_dict(), tmp_path / "teacher-v2.pt")
    out = tmp_path / "w.zarr"
    cli(*PRE, "--weights", tmp_path / "teacher-v2.pt", "--out", out)
    with open_cache(str(out)) as c:
        assert "init_seed" not in c.spec.teacher  # trained teachers keep their keys
        sha = c.spec.teacher["weights_sha256"]
    assert f"file teacher-v2.pt sha256 {sha[:12]}" in cli("cache", "info", out).output
    assert "teacher-v2.pt" in cli("cache", "ls", tmp_path).output


# -- 12. text caches carry their tokenizer ---------------------------------------------------
def _text_distill(cache, data, student, out, ok=True):
    return cli("distill", "--student", f"hf:{student}", "--loss", "kd", "--cache", cache,
               "--dataset", "text", "--data-root", data, "--test-split", "none", "--epochs", "1",
               "--batch-size", "4", "--optimizer", "adamw", "--lr", "1e-3", "--no-plots",
               "--out", out, ok=ok)  # fmt: skip


def test_12_pulled_text_cache_is_self_contained(tmp_path, make_text_file, tiny_bert_dir):
    import shutil

    data = make_text_file("jsonl", n=12)
    teacher = tmp_path / "teammate" / "bert"  # the teacher's directory, on another machine
    shutil.copytree(tiny_bert_dir, teacher)
    cache = tmp_path / "teammate" / "t.zarr"
    cli("precompute", "--teacher", f"hf:{teacher}", "--dataset", "text", "--data-root", data,
        "--augment", "token-mask", "--num-augs", "2", "--max-length", "16",
        "--out", cache)  # fmt: skip
    with open_cache(str(cache)) as c:
        files = c.tokenizer_files()
        assert "tokenizer.json" in files and c.attrs["tokenizer"]["files"] == sorted(files)
    pulled = tmp_path / "here" / "t.h5"
    pulled.parent.mkdir()
    cli("cache", "pull", cache, pulled, "--no-progress")
    shutil.rmtree(tmp_path / "teammate")  # neither the teacher nor its tokenizer path exist
    assert verify(str(pulled)) == []
    _text_distill(pulled, data, tiny_bert_dir, tmp_path / "run")
    assert "ok" in cli("cache", "verify", pulled, "--replay", "--data-root", data).output
    # a damaged tokenizer blob is caught by verify
    with h5py.File(pulled, "r+") as f:
        f["tokenizer"][5] ^= 1
    assert any("tokenizer fails its sha256" in p for p in verify(str(pulled)))


def test_12_student_with_other_vocabulary_one_error_line(tmp_path, make_text_file, tiny_bert_dir):
    from transformers import BertConfig, BertForSequenceClassification

    data = make_text_file("jsonl", n=12)
    cache = tmp_path / "t.zarr"
    cli("precompute", "--teacher", f"hf:{tiny_bert_dir}", "--dataset", "text", "--data-root",
        data, "--num-augs", "1", "--augment", "identity", "--max-length", "16",
        "--out", cache)  # fmt: skip
    small = tmp_path / "small-bert"
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=3)  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(small)
    with open_cache(str(cache)) as c:
        from kdcache.models.factory import load_tokenizer

        n_tok = len(load_tokenizer({"modality": "text", "name": "t",
                                    "tokenizer_files": c.tokenizer_files()}))  # fmt: skip
    line = err_line(_text_distill(cache, data, small, tmp_path / "run", ok=False))
    assert "vocabulary of 50 tokens" in line and f"has {n_tok}" in line
    assert not (tmp_path / "run").exists()


def test_2_precompute_hdf5_full_disk_then_rerun_bit_identical(tmp_path, small_disk, monkeypatch):
    from kdcache.cache import space

    disk, resize = small_disk
    args = ["precompute", "--teacher", "resnet8", "--random-init", "--dataset", "digits",
            "--max-samples", "256", "--num-augs", "8", "--chunk-samples", "16",
            "--dtype", "float32", "--batch-size", "128"]  # fmt: skip
    ref = tmp_path / "ref.h5"
    cli(*args, "--out", ref)
    monkeypatch.setattr(space, "MARGIN_BYTES", 4096)
    data = 256 * 8 * (10 + 3) * 4  # logits + view params: the disk fills half way through them
    resize(f"{(os.path.getsize(ref) - data // 2) // 4096 * 4}k")
    out = disk / "x.h5"
    line = err_line(cli(*args, "--out", out, ok=False))
    assert "no space left" in line and "finished chunks of 16 are kept" in line
    with open_cache(str(out)) as c:
        assert 0 < int(c.done().sum()) < 16, (line, os.path.getsize(ref))
    assert sorted(os.listdir(disk)) == ["x.h5", "x.h5.config.yaml"]  # no lock, no temp file
    resize("2m")
    cli(*args, "--out", out)
    assert verify(str(out)) == [] and same_bytes(ref, out)


def test_2_distill_on_a_full_disk_then_resume(small_disk):
    disk, resize = small_disk
    resize("512k")  # resnet8 + SGD state is ~0.6 MiB: the first checkpoint cannot fit
    out = disk / "run"
    line = err_line(cli(*TRAIN, "--epochs", "1", "--out", out, ok=False))
    assert "no space left" in line and "no epoch was committed yet" in line
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"]  # no torn metrics or *.tmp-*
    resize("4m")
    cli(*TRAIN, "--epochs", "1", "--out", out, "--resume")
    assert _ck(out / "last.pt")["epoch"] == 0 and (out / "best.pt").exists()


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "c.zarr"
    cli("precompute", "--teacher", "resnet8", "--random-init", "--dataset", "digits",
        "--max-samples", "32", "--num-augs", "2", "--chunk-samples", "16",
        "--out", out)  # fmt: skip
    return out


def test_4_distill_refuses_hand_edited_cache(tmp_path, digits_cache):
    import shutil

    edited = tmp_path / "edited.zarr"
    shutil.copytree(digits_cache, edited)
    edit_spec(edited, "storage", dtype="bfloat16")
    args = [a if a != "ce" else "kd" for a in TRAIN]
    line = err_line(cli(*args, "--cache", edited, "--epochs", "1", "--out", tmp_path / "r",
                        ok=False))  # fmt: skip
    assert "does not match its own spec" in line and "dtype float16; spec says bfloat16" in line
    assert not (tmp_path / "r").exists()


def test_11_resume_with_another_teacher_cache_refused(tmp_path, digits_cache):
    other = tmp_path / "other.zarr"
    cli("precompute", "--teacher", "resnet8", "--random-init", "5", "--dataset", "digits",
        "--max-samples", "32", "--num-augs", "2", "--chunk-samples", "16",
        "--out", other)  # fmt: skip
    args = [a if a != "ce" else "kd" for a in TRAIN]
    out = tmp_path / "run"
    cli(*args, "--cache", digits_cache, "--epochs", "2", "--max-steps", "2", "--out", out)
    line = err_line(cli(*args, "--cache", other, "--epochs", "2", "--out", out, "--resume",
                        ok=False))  # fmt: skip
    assert "must read the same teacher logits" in line
    moved = tmp_path / "moved.zarr"  # the same cache at another path is fine
    os.rename(digits_cache, moved)
    try:
        cli(*args, "--cache", moved, "--epochs", "2", "--out", out, "--resume")
    finally:
        os.rename(moved, digits_cache)
    assert _ck(out / "last.pt")["epoch"] == 1


def test_8_distill_temp_checkpoint_of_killed_run_removed(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = out / f"last.pt.tmp-{_dead_pid()}"
    dead.write_bytes(b"torn")
    live = out / "best.pt.tmp-1"  # pid 1 runs: another live writer's temp file
    live.write_bytes(b"being written")
    cli(*TRAIN, "--epochs", "1", "--out", out)
    assert not dead.exists() and live.exists()
