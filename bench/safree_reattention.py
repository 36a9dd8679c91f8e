"""Cost of SAFREE Latent Re-Attention relative to plain sampling, and of SAFREE Conditioning.

    python -m bench.safree_reattention                         # SD1.5-shaped random model (use a GPU)
    python -m bench.safree_reattention --tiny --size 64        # the tiny test checkpoint (CPU; never fires)
    python -m bench.safree_reattention --checkpoint PATH       # a real SD1.x checkpoint

The tiny test checkpoint has one UNet level, so re-attention (which acts at FreeU's 2x and 4x channel
stages) never fires there; the default builds a random-weight model with SD1.5's real UNet shape. The
filtered prompt is used for every step (self-validating filter off), the worst case: one extra UNet row
per step (the original-prompt branch), so the FLOP floor is 1.5x for batch 1. Runs are interleaved and
the medians and their ratio printed, with the time of SafreeConditioning (17 nudity keywords).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from implicit_negatives.comfyui import headless, rig
from implicit_negatives.safree import SAFREE_SKIP_SCALES

def random_sd15_shaped(device: str):
    """(model, clip) with SD1.5's UNet and CLIP-L shapes and random fp16 weights (generated on ``device``)."""
    import comfy.ops
    import comfy.sd
    import comfy.sd1_clip
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    generator = torch.Generator(device=device).manual_seed(0)

    def fill(module, prefix):
        out = {}
        for key, value in module.state_dict().items():
            if key.endswith("position_ids"):
                out[prefix + key] = torch.arange(value.shape[-1]).expand(value.shape).clone()
                continue
            norm = any(part in key for part in ("norm", "ln_", "layer_norm")) and len(value.shape) == 1
            if norm and key.endswith("weight"):
                tensor = torch.ones(value.shape)
            elif norm or key.endswith("bias"):
                tensor = torch.zeros(value.shape)
            else:
                tensor = torch.randn(value.shape, generator=generator, device=device) * 0.02
            out[prefix + key] = tensor.to(torch.float16).cpu()
        return out

    with torch.device("meta"):
        unet = UNetModel(**rig.FULL_UNET_CONFIG, operations=comfy.ops.disable_weight_init)
        clip = comfy.sd1_clip.SDClipModel(device="meta")
    state = {**fill(unet, "model.diffusion_model."), **fill(clip, "cond_stage_model.")}
    return comfy.sd.load_state_dict_guess_config(state, output_vae=False, output_clip=True)[:2]


SAFREE_PROMPT = "a photo of a naked woman lying on a beach at sunset"


def safree_conditioning(nodes, clip, synchronize=lambda: None, prompt: str = SAFREE_PROMPT):
    """(seconds, (positive, negative, report)) of SafreeConditioning with its default 17 nudity keywords and the
    filtered prompt on every step (self-validating filter off), timed after one warm-up call."""
    conditioning = nodes.NODE_CLASS_MAPPINGS["SafreeConditioning"]
    keywords = conditioning.define_schema().inputs[2].default
    conditioning.execute(clip, "warm up", "Nudity", 0.01, False, 10, "default", 50, "concept")
    synchronize()
    start = time.perf_counter()
    result = conditioning.execute(clip, prompt, keywords, 0.01, False, 10, "default", 50, "concept").result
    synchronize()
    return time.perf_counter() - start, result


def reattention(nodes, model, safree_positive):
    """``model`` with SAFREE's latent re-attention (the node's default s1, s2)."""
    return nodes.NODE_CLASS_MAPPINGS["SafreeLatentReAttention"].execute(model, safree_positive, True,
                                                                        *SAFREE_SKIP_SCALES).result[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.safree_reattention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="an SD1.x checkpoint (default: SD1.5-shaped random weights)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random test checkpoint instead")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size/8)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    nodes = headless.import_comfyui(development_copy=True)
    headless.load_pack(nodes)
    import comfy.model_management
    import comfy.sd
    device = comfy.model_management.get_torch_device()
    if args.checkpoint or args.tiny:
        checkpoint = args.checkpoint or rig.tiny_checkpoint_path()
        model, clip = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False)[:2]
    else:
        model, clip = random_sd15_shaped("cuda" if device.type == "cuda" else "cpu")

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    conditioning_s, (positive, negative, report) = safree_conditioning(nodes, clip, synchronize)
    print(report)
    variants = {"plain": model, "re-attention": reattention(nodes, model, positive)}
    latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}

    def sample(patched) -> float:
        synchronize()
        begin = time.perf_counter()
        nodes.common_ksampler(patched, 0, args.steps, 7.5, "euler", "normal", positive, negative, latent)
        synchronize()
        return time.perf_counter() - begin

    for patched in variants.values():
        sample(patched)  # warm-up: kernels, cuFFT plans
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, patched in variants.items():
            times[name].append(sample(patched))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"device {device}, {args.size}px, {args.steps} steps, filtered prompt on every step")
    print(f"SafreeConditioning (17 keywords, {len(SAFREE_PROMPT.split())}-word prompt): {conditioning_s:.3f} s")
    for name, value in medians.items():
        print(f"{name:>14}: {value:.3f} s  ({value / medians['plain']:.2f}x plain)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
