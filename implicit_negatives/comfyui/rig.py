"""Random-weight checkpoints in the real single-file layouts, for tests, benchmarks and device checks.

ComfyUI detects the tiny SD1.5 one as SD15 exactly like a downloaded v1-5 checkpoint (comfyui.md §6.4), so every
engine path runs for real on a CPU in seconds; the full-size one has the real 859.5M-parameter UNet shape:
random weights, real cost. The tiny SDXL and SD2.x ones (``tiny_family_checkpoint_path``) are detected as
``supported_models.SDXL`` and as ``SD20`` with v-prediction. Building needs ComfyUI imported (its model classes give
the shapes, its checkpoint-saving conversions give the file layout).
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

# Tiny SDXL (detected as supported_models.SDXL, model_base.SDXL). The detector matches model_channels 320, linear
# transformers, context 2048, ADM 2816 and the *input* transformer depths [0, 0, 2, 2, 10, 10] exactly (shorter lists
# are SSD-1B, Vega or KOALA), so three levels of two res blocks with 24 input transformer blocks stay; the width is
# kept at 320 on every level (channel_mult is not matched), and the middle and output blocks get no transformer
# (neither is matched): 77M UNet parameters instead of 2.57G.
TINY_SDXL_UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
    channel_mult=[1, 1, 1], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0] * 9,
    transformer_depth_middle=-2, context_dim=2048, num_heads=-1, num_head_channels=64,
    use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential", use_spatial_transformer=True,
)
# Tiny SD2.x (detected as supported_models.SD20): context 1024 and linear transformers are all the detector matches.
# ComfyUI decides v-prediction from output_blocks.11.1.transformer_blocks.0.norm1.bias (std > 0.09, as in the real
# 768-v checkpoints), so four levels of two res blocks keep that block, and the rig draws that bias with std 0.2
# (``V_PREDICTION_KEY``); the detector reads the context width off the first *input* transformer, so the last input
# block has one too. Two transformer blocks in all.
TINY_SD2_UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
    channel_mult=[1, 1, 1, 1], transformer_depth=[0] * 7 + [1], transformer_depth_output=[1] + [0] * 11,  # popped from the end: [0] is the last block
    transformer_depth_middle=-2, context_dim=1024, num_heads=-1, num_head_channels=64,
    use_linear_in_transformer=True, adm_in_channels=None, use_spatial_transformer=True,
)
V_PREDICTION_KEY = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
FAMILY_RECIPE_VERSION = "tiny-family-v1"


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


def build_family_state_dict(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny SDXL or SD2.x single-file state dict with random weights, laid out by ComfyUI's own
    checkpoint-saving conversions (``process_*_state_dict_for_saving``: the sgm layout of SDXL, OpenCLIP
    ``cond_stage_model.model.`` of SD2). The text encoders keep their full size (ComfyUI fixes their configs:
    CLIP-L 123M + CLIP-G 695M for SDXL, OpenCLIP-H 354M for SD2) and are stored in fp16, as downloads are."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.ldm.models.autoencoder import AutoencoderKL
    import comfy.ops
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.text_encoders.sd2_clip

    if family == "sdxl":
        config, model_config = TINY_SDXL_UNET_CONFIG, comfy.supported_models.SDXL
        make_clip = comfy.sdxl_clip.SDXLClipModel
    elif family == "sd2":
        config, model_config = TINY_SD2_UNET_CONFIG, comfy.supported_models.SD20
        make_clip = comfy.text_encoders.sd2_clip.SD2ClipModel
    else:
        raise ValueError(f"Unknown tiny checkpoint family {family!r}: choose 'sdxl' or 'sd2' (SD1.5: tiny_checkpoint_path)")
    model_config = model_config(dict(model_config.unet_config))
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        unet = UNetModel(**config, operations=comfy.ops.disable_weight_init)
        clip = make_clip(device="meta")
        vae = AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4)
    unet_state = _fill(_shapes(unet), "", generator)
    if family == "sd2":
        unet_state[V_PREDICTION_KEY] = (torch.randn(unet_state[V_PREDICTION_KEY].shape, generator=generator)
                                        * 0.2).to(torch.float16)
    state = model_config.process_unet_state_dict_for_saving(unet_state)
    state.update(model_config.process_clip_state_dict_for_saving(_fill(_shapes(clip), "", generator)))
    state.update(model_config.process_vae_state_dict_for_saving(_fill(_shapes(vae), "", generator)))
    return {key: value.contiguous() for key, value in state.items()}


def tiny_family_checkpoint_path(family: str, seed: int = 0) -> str:
    """Build (once per recipe and seed) and cache the tiny SDXL (``"sdxl"``) or SD2.x (``"sd2"``) checkpoint."""
    config = {"sdxl": TINY_SDXL_UNET_CONFIG, "sd2": TINY_SD2_UNET_CONFIG}.get(family)
    if config is None:
        raise ValueError(f"Unknown tiny checkpoint family {family!r}: choose 'sdxl' or 'sd2'")
    recipe = hashlib.sha256(f"{FAMILY_RECIPE_VERSION}{family}{config}{VAE_DDCONFIG}{seed}".encode()).hexdigest()[:12]
    return _cached_fixture(f"tiny-{family}-{recipe}.safetensors", lambda: build_family_state_dict(family, seed))


def _cached_fixture(file_name: str, build_state_dict) -> str:
    """``CACHE_DIR/fixtures/file_name``, written once (atomically) from ``build_state_dict()`` when missing."""
    from safetensors.torch import save_file
    folder = os.path.join(CACHE_DIR, "fixtures")
    path = os.path.join(folder, file_name)
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        with atomic_path(path) as temp:
            save_file(build_state_dict(), temp)
    return path


def load_tiny_family(family: str, text_encoder_layers: int | None = 3, embedding_directory=None):
    """(model, clip, vae) of the tiny SDXL / SD2.x checkpoint through ComfyUI's checkpoint loader (the function
    CheckpointLoaderSimple calls), with each text encoder cut to its first ``text_encoder_layers`` layers
    (ComfyUI's ``te_model_options`` ``clip_<key>_model_config``; None: full size). Three layers keep the penultimate
    layer SDXL and SD2 read (ComfyUI asserts |layer_idx| < layers), with the real token tables and projections: an SDXL
    text encode gets about eight times cheaper on a CPU."""
    import comfy.sd
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        tiny_family_checkpoint_path(family), output_vae=True, output_clip=True,
        embedding_directory=embedding_directory, te_model_options=cut_text_encoders(text_encoder_layers))
    return model, clip, vae


def cut_text_encoders(layers: int | None) -> dict:
    """ComfyUI's ``te_model_options`` that keep the first ``layers`` layers of every CLIP text encoder (CLIP-L,
    CLIP-G, OpenCLIP-H); None: full size."""
    return {} if layers is None else {f"clip_{key}_model_config": {"num_hidden_layers": layers} for key in "lgh"}


def tiny_checkpoint_path(seed: int = 0, full_size: bool = False) -> str:
    """Build (once per recipe and seed) and cache the tiny (or full-size) SD1.5 checkpoint; return its path."""
    unet_config = FULL_UNET_CONFIG if full_size else TINY_UNET_CONFIG
    recipe = hashlib.sha256(f"{TINY_RECIPE_VERSION}{unet_config}{VAE_DDCONFIG}{seed}".encode()).hexdigest()[:12]
    return _cached_fixture(f"{'full' if full_size else 'tiny'}-sd15-{recipe}.safetensors",
                           lambda: build_sd15_state_dict(seed, unet_config))
