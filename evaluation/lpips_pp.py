"""PP = 1 - LPIPS(original model's image, defended model's image), only with locally available weights.

LPIPS needs two weight files: the ``lpips`` package's linear layers (shipped in its wheel) and the ImageNet
backbone (torchvision's AlexNet/VGG, normally downloaded on first use). Nothing is downloaded here: the
backbone comes from ``[pp] lpips_backbone`` or torch's hub cache, else PP is reported as unavailable with
the reason. Backbone files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os

BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


class Unavailable(RuntimeError):
    """PP cannot be computed honestly here; the message says what is missing."""


def find_backbone(net: str, configured: str) -> str:
    if configured:
        if not os.path.isfile(configured):
            raise Unavailable(f"lpips_backbone {configured} does not exist")
        return configured
    if net not in BACKBONE_FILES:
        raise Unavailable(f"lpips_net must be one of {sorted(BACKBONE_FILES)}, got {net!r}")
    import torch
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", BACKBONE_FILES[net])
    if os.path.isfile(cached):
        return cached
    raise Unavailable(f"no local {net} backbone weights: set [pp] lpips_backbone = '/path/{BACKBONE_FILES[net]}' "
                      f"(torchvision ImageNet weights) or place the file in {os.path.dirname(cached)}")


def load_lpips(net: str = "alex", backbone: str = "", linear: str = ""):
    """An ``lpips.LPIPS`` model with local weights only; raises Unavailable when any is missing."""
    try:
        import lpips
    except ImportError:
        raise Unavailable("the lpips package is not installed (pip install lpips)") from None
    import torch
    path = find_backbone(net, backbone)
    if linear and not os.path.isfile(linear):
        raise Unavailable(f"lpips_linear {linear} does not exist")
    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, model_path=linear or None, verbose=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    own = dict(model.net.named_parameters())
    # lpips splits torchvision's `features` into slices but keeps the layer indices: sliceK.<i>.weight.
    loaded = {name: features[name.split(".", 1)[1]] for name in own if name.split(".", 1)[1] in features}
    if len(loaded) != len(own):
        raise Unavailable(f"{path} is not a torchvision {net} state dict ({len(loaded)}/{len(own)} backbone tensors)")
    with torch.no_grad():
        for name, tensor in loaded.items():
            own[name].copy_(tensor)
    return model.eval()


def lpips_distance(model, path_a: str, path_b: str) -> float:
    """LPIPS between two image files (RGB, scaled to [-1, 1]; sizes must match)."""
    import numpy as np
    import torch
    from PIL import Image

    def tensor(path):
        with Image.open(path) as handle:
            array = np.asarray(handle.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1)[None]

    with torch.no_grad():
        return float(model(tensor(path_a), tensor(path_b)).reshape(-1)[0])
