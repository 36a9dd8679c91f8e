"""The test rig: find a real ComfyUI, import it for CPU use, build tiny checkpoints, run graphs.

Nothing here fakes ComfyUI. The engine is located in this order:
  1. ``$COMFYUI_PATH`` (a ComfyUI source tree; ``.ci/run`` points it at a writable copy);
  2. a copy of ``<repo>/../shared/comfyui/<version>`` made into the user cache
     (ComfyUI writes next to itself, and ``shared/`` may be read-only);
  3. otherwise the engine tests are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sys
import uuid

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_COMFYUI_VERSION = os.environ.get("IMPLICIT_NEGATIVES_COMFYUI_VERSION", "0.8.0")
CACHE_DIR = os.environ.get(
    "IMPLICIT_NEGATIVES_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "implicit-negatives"))

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


def locate_comfyui() -> tuple[str | None, str]:
    """Return (path, how it was found) or (None, why not)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        if os.path.isfile(os.path.join(env, "comfy", "sd.py")):
            return env, "COMFYUI_PATH"
        return None, f"COMFYUI_PATH={env} is not a ComfyUI source tree (no comfy/sd.py)"
    shared = os.path.join(os.path.dirname(REPO_ROOT), "shared", "comfyui", DEFAULT_COMFYUI_VERSION)
    if os.path.isfile(os.path.join(shared, "comfy", "sd.py")):
        target = os.path.join(CACHE_DIR, f"comfyui-{DEFAULT_COMFYUI_VERSION}")
        if not os.path.isfile(os.path.join(target, "comfy", "sd.py")):
            shutil.copytree(shared, target + ".partial", dirs_exist_ok=True)
            os.replace(target + ".partial", target)
        return target, f"copy of {shared}"
    return None, ("no ComfyUI found: set COMFYUI_PATH to a ComfyUI checkout "
                  "(e.g. git clone --depth 1 --branch v0.8.0 https://github.com/comfyanonymous/ComfyUI)")


def import_comfy(path: str):
    """Put ComfyUI on sys.path, force CPU, and return its ``nodes`` module (built-ins registered)."""
    if path not in sys.path:
        sys.path.insert(0, path)
    from comfy.cli_args import args
    if not torch.cuda.is_available():
        args.cpu = True  # before comfy.model_management is imported, else it asserts on CUDA
    import comfy.model_management  # noqa: F401
    import nodes
    return nodes


def load_engine_and_pack():
    """For scripts (benchmarks, tools): import ComfyUI, load this pack through ComfyUI's custom-node
    loader, and return (ComfyUI's ``nodes`` module, the pack's root package)."""
    path, how = locate_comfyui()
    if path is None:
        raise SystemExit(f"this needs ComfyUI: {how}")
    nodes = import_comfy(path)
    if not asyncio.run(nodes.load_custom_node(REPO_ROOT)):
        raise SystemExit("ComfyUI failed to load the pack (see log)")
    return nodes, sys.modules[REPO_ROOT.replace(".", "_x_")]


# --------------------------------------------------------------------------- tiny checkpoints

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
        temp = path + f".{os.getpid()}.partial"
        save_file(build_sd15_state_dict(seed, unet_config), temp)
        os.replace(temp, path)
    return path


# --------------------------------------------------------------------------- graphs

class MessageSink:
    """What PromptExecutor talks to instead of a websocket server: it records the messages."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def __init__(self):
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def run_graph(prompt: dict, outputs: list[str] | None = None) -> tuple[object, MessageSink]:
    """Validate an API-format graph with ComfyUI's validator, then run it in ComfyUI's executor.

    Returns (executor, sink). Raises AssertionError with ComfyUI's own error report when the
    graph is invalid or a node fails.
    """
    import execution
    prompt_id = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    assert valid[0], f"ComfyUI rejected the graph: {valid[1]} {valid[3]}"
    sink = MessageSink()
    import inspect
    if "cache_args" in inspect.signature(execution.PromptExecutor).parameters:  # 0.8.0
        executor = execution.PromptExecutor(sink, cache_type=False, cache_args={"lru": 0, "ram": 0})
    else:  # 0.3.64
        executor = execution.PromptExecutor(sink, cache_type=False)
    executor.execute(prompt, prompt_id, {}, outputs if outputs is not None else valid[2])
    errors = [data for event, data in sink.messages if event == "execution_error"]
    assert executor.success and not errors, f"graph failed: {errors}"
    return executor, sink
