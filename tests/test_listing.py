"""`kdcache list`: generated from the registries (a new entry shows up without CLI changes)."""

from __future__ import annotations

import json

from tests.clitools import cli


def test_list_losses_shows_every_hparam_default_and_domain():
    from kdcache.distill.losses import LOSSES

    rows = json.loads(cli("list", "losses", "--json").output)
    assert [r["name"] for r in rows] == list(LOSSES)
    wsl = next(r for r in rows if r["name"] == "wsl")
    assert wsl["teacher"] == "cache"
    hp = {h["name"]: h for h in wsl["hparams"]}
    assert hp["T"]["default"] == 4.0 and hp["alpha"]["default"] == 2.25
    assert hp["T"]["domain"]  # e.g. "> 0"
    text = cli("list", "losses").output
    assert "lsr-os-tc" in text and "teacher: none" in text


def test_list_views_and_datasets_come_from_the_registries(monkeypatch):
    from kdcache.data.views import POLICIES, CropFlip

    rows = json.loads(cli("list", "views", "--json").output)
    crop = next(r for r in rows if r["name"] == "crop-flip")
    assert crop["view_params"] == ["dx", "dy", "flip"] and crop["options"]["pad"] == 4
    rrc = next(r for r in rows if r["name"] == "rrc-flip")
    assert rrc["view_params"] == ["top", "left", "h", "w", "flip"]

    class Twice(CropFlip):  # a newly registered policy is listed with its own help
        name, help = "twice", "a test policy"

    monkeypatch.setitem(POLICIES, "twice", Twice)
    assert "twice" in cli("list", "views").output and "a test policy" in cli("list", "views").output
    names = [r["name"] for r in json.loads(cli("list", "datasets", "--json").output)]
    assert {"cifar10", "cifar100", "digits", "imagefolder", "text", "hfds:", "wds:"} <= set(names)


def test_list_models_filters_timm_and_torchvision_names():
    rows = {r["source"]: r for r in json.loads(cli("list", "models", "--json").output)}
    assert "resnet8x4" in rows["cifar"]["names"] and rows["timm"]["names"] == []
    rows = {
        r["source"]: r
        for r in json.loads(cli("list", "models", "--filter", "resnet1*", "--json").output)
    }
    assert "resnet18" in rows["timm"]["names"] and "tv:resnet18" in rows["tv:"]["names"]
    assert "resnet110" in rows["cifar"]["names"] and "resnet8" not in rows["cifar"]["names"]


def test_list_unknown_kind_is_one_error_line():
    res = cli("list", "optimizers", ok=False)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "optimizers" in lines[0]
