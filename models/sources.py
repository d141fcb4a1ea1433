"""Model sources, one registry (``MODEL_SOURCES``, the idiom of ``cache/registry.py``): how a
name is recognised (``tv:``, ``hf:``, the CIFAR zoo, timm), built and its preprocessing
(input size, mean/std, interpolation, crop_pct) resolved from the model itself."""

from __future__ import annotations

from kdcache.cache.errors import KdcacheError
from kdcache.cache.registry import registry_decorator
from kdcache.models.cifar_zoo import CIFAR100_MEAN, CIFAR100_STD, CIFAR_MODELS, create_cifar_model
from kdcache.models.weights import load_matching
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MODEL_SOURCES: dict = {}
# the registry idiom of cache/registry.py; each source class: matches(name), resolve(name)
register_model_source = registry_decorator(MODEL_SOURCES, "model source")


@register_model_source("tv:", help="tv:NAME, a torchvision classification model (tv:resnet18)")
class _TV:
    @staticmethod
    def matches(name: str) -> bool:
        return name.startswith("tv:")

    @staticmethod
    def resolve(name: str) -> tuple[str, str]:
        _check_tv_name(name[3:])
        return "torchvision", name[3:]


@register_model_source("hf:", help="hf:PATH_OR_ID, a Hugging Face sequence classifier (text)")
class _HF:
    @staticmethod
    def matches(name: str) -> bool:
        return name.startswith("hf:")


@register_model_source("cifar", help="the CIFAR zoo of the KD literature (resnet8x4, wrn_40_2...)")
class _Cifar:
    @staticmethod
    def matches(name: str) -> bool:
        return name in CIFAR_MODELS

    @staticmethod
    def resolve(name: str) -> tuple[str, str]:
        return "cifar", name


@register_model_source("timm", help="any timm model name (resnet50, vit_small_patch16_224...)")
class _Timm:
    @staticmethod
    def matches(name: str) -> bool:
        return _is_timm_model(name)

    @staticmethod
    def resolve(name: str) -> tuple[str, str]:
        return "timm", name


def model_source(name: str) -> str:
    """The ``MODEL_SOURCES`` key that builds ``name`` (prefixes first, then CIFAR zoo, timm)."""
    for key, src in MODEL_SOURCES.items():
        if src.matches(name):
            return key
    raise KdcacheError(
        f"unknown model {name!r}: expected a timm name (e.g. resnet50, vit_small_patch16_224), "
        f"tv:NAME (torchvision, e.g. tv:resnet18), hf:PATH_OR_ID (Hugging Face sequence "
        f"classifier, e.g. hf:bert-base-uncased) or a CIFAR-zoo name "
        f"({', '.join(CIFAR_MODELS)})"
    )


def _is_timm_model(name: str) -> bool:
    import timm

    return name.startswith(("hf-hub:", "hf_hub:", "local-dir:")) or bool(timm.is_model(name))


def _check_tv_name(arch: str) -> None:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        raise KdcacheError(
            f"unknown torchvision classification model {arch!r} (e.g. {', '.join(known[:5])}...)"
        )


def _build_timm(arch: str, n: int | None, pretrained: bool, kwargs: dict) -> nn.Module:
    import timm

    if n is not None:
        kwargs = {**kwargs, "num_classes": n}
    return timm.create_model(arch, pretrained=pretrained, **kwargs)


def _build_tv(arch: str, n: int | None, pretrained: bool, kwargs: dict) -> nn.Module:
    import torchvision

    if not pretrained:
        return torchvision.models.get_model(
            arch, weights=None, **kwargs, **({} if n is None else {"num_classes": n})
        )
    w = torchvision.models.get_model_weights(arch).DEFAULT
    net = torchvision.models.get_model(arch, weights=w, **kwargs)
    if n is None or n == len(w.meta.get("categories", [])):
        return net
    fresh = torchvision.models.get_model(arch, weights=None, num_classes=n, **kwargs)
    load_matching(fresh, net.state_dict())
    return fresh


def _build_cifar(arch: str, n: int | None, pretrained: bool, kwargs: dict) -> nn.Module:
    if pretrained:
        raise KdcacheError(
            f"CIFAR-zoo model {arch!r} has no downloadable weights; pass --weights PATH "
            "(e.g. a RepDistiller checkpoint)"
        )
    return create_cifar_model(arch, 100 if n is None else n)


def _pre_timm(net: nn.Module, arch: str) -> dict:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=net)
    return {
        "input_size": [int(v) for v in cfg["input_size"]],
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "interpolation": str(cfg.get("interpolation", "bilinear")),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
    }


def _pre_tv(net: nn.Module, arch: str) -> dict:
    import torchvision

    try:
        t = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
        crop, mean, std = int(t.crop_size[0]), list(t.mean), list(t.std)
        resize, interp = int(t.resize_size[0]), t.interpolation.value
    except Exception:  # noqa: BLE001 - models without weight metadata get ImageNet defaults
        crop, mean, std, resize, interp = (
            224,
            list(IMAGENET_MEAN),
            list(IMAGENET_STD),
            256,
            "bilinear",
        )
    return {
        "input_size": [3, crop, crop],
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "interpolation": str(interp),
        "crop_pct": round(crop / resize, 6),
    }


def _pre_cifar(net: nn.Module, arch: str) -> dict:
    return {
        "input_size": [3, 32, 32],
        "mean": list(CIFAR100_MEAN),
        "std": list(CIFAR100_STD),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }


_BUILDERS = {"timm": _build_timm, "torchvision": _build_tv, "cifar": _build_cifar}
_PREPROCESSORS = {"timm": _pre_timm, "torchvision": _pre_tv, "cifar": _pre_cifar}
