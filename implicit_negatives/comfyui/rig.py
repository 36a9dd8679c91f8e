"""Random-weight checkpoints in the real SD1.x single-file layout, for tests, benchmarks and device checks.

ComfyUI detects the tiny one as SD15 exactly like a downloaded v1-5 checkpoint (comfyui.md §6.4), so every
engine path runs for real on a CPU in seconds; the full-size one has the real 859.5M-parameter UNet shape:
random weights, real cost. Building needs ComfyUI imported (its model classes give the shapes).
"""

from __future__ import annotations

import hashlib
import os

import torch

from ..atomic_write import atomic_path
from .headless import CACHE_DIR

# The tiny SD1.5 recipe (comfyui.md §6.4): model_channels must stay 320 for ComfyUI to detect SD15;
# one level, one res block, one transformer block. CLIP-L and the VAE keep their real shapes because
# ComfyUI fixes their configs when loading a single-file checkpoint.
TINY_UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
    channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
    transformer_depth_middle=-2, context_dim=768, num_heads=8, use_linear_in_transformer=False,
    adm_in_channels=None, use_spatial_transformer=True,
)
# The real SD1.5 UNet shape (859.5M parameters), for real-scale benchmarks on a GPU: random weights,
# real cost. ComfyUI detects it as SD15 exactly like a downloaded v1-5 checkpoint.
FULL_UNET_CONFIG = dict(
    TINY_UNET_CONFIG, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    transformer_depth_middle=1,
)
VAE_DDCONFIG = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
                'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}
TINY_RECIPE_VERSION = "tiny-sd15-v1"




def _fill(state_shapes: dict[str, torch.Size], prefix: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Deterministic random weights: norms at 1/0, everything else small Gaussian noise."""
    out = {}
    for key, shape in state_shapes.items():
        if key.endswith("position_ids"):
            out[prefix + key] = torch.arange(shape[-1]).expand(shape).clone()
            continue
        is_norm = any(part in key for part in ("norm", "ln_", "layer_norm")) and len(shape) == 1
        if is_norm and key.endswith("weight"):
            tensor = torch.ones(shape)
        elif is_norm or key.endswith("bias"):
            tensor = torch.zeros(shape)
        else:
            tensor = torch.randn(shape, generator=generator) * 0.02
        out[prefix + key] = tensor.to(torch.float16)
    return out


def _shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def build_sd15_state_dict(seed: int = 0, unet_config: dict = TINY_UNET_CONFIG) -> dict[str, torch.Tensor]:
    """An SD1.x single-file (CompVis layout) state dict with random weights. Needs ComfyUI imported."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.ldm.models.autoencoder import AutoencoderKL
    import comfy.sd1_clip
    import comfy.ops

    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        unet = UNetModel(**unet_config, operations=comfy.ops.disable_weight_init)
        clip = comfy.sd1_clip.SDClipModel(device="meta")
        vae = AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4)
    state = {}
    state.update(_fill(_shapes(unet), "model.diffusion_model.", generator))
    state.update(_fill(_shapes(clip), "cond_stage_model.", generator))
    state.update(_fill(_shapes(vae), "first_stage_model.", generator))
    return state


def tiny_checkpoint_path(seed: int = 0, full_size: bool = False) -> str:
    """Build (once per recipe and seed) and cache the tiny (or full-size) SD1.5 checkpoint; return its path."""
    from safetensors.torch import save_file
    unet_config = FULL_UNET_CONFIG if full_size else TINY_UNET_CONFIG
    recipe = hashlib.sha256(f"{TINY_RECIPE_VERSION}{unet_config}{VAE_DDCONFIG}{seed}".encode()).hexdigest()[:12]
    folder = os.path.join(CACHE_DIR, "fixtures")
    path = os.path.join(folder, f"{'full' if full_size else 'tiny'}-sd15-{recipe}.safetensors")
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        with atomic_path(path) as temp:
            save_file(build_sd15_state_dict(seed, unet_config), temp)
    return path
