"""Cost of SafeDenoiser relative to plain CFG and to SafeLatentGuidance, measured side by side in one run.

    python -m bench.safe_denoiser_overhead                       # tiny random SD1.5 checkpoint, CPU or GPU
    python -m bench.safe_denoiser_overhead --full-size --size 512 --steps 25          # SD1.5-sized UNet (GPU)
    python -m bench.safe_denoiser_overhead --checkpoint PATH --size 512 --steps 25    # a real checkpoint

Samples the same seed with the stock KSampler: plain CFG, SLD (one extra model evaluation per step), and
SafeDenoiser with N = 25 and N = 250 negation latents, once acting at every step (window 0 → 1, its worst
case) and once in its default early window (0 → 0.2). Random latents stand in for encoded images: the cost
does not depend on their content. Runs are interleaved so machine load hits all variants alike; the medians
and their ratios to plain CFG and to SLD are printed. SafeDenoiser adds no model evaluation, only a
(batch × N) distance matrix and a weighted sum over N·C·H·W values per evaluation inside its window.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from implicit_negatives.comfy import headless, rig
from implicit_negatives.safe_denoiser import NegationSet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.safe_denoiser_overhead",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="SD1.x/SDXL checkpoint file (default: the tiny random SD1.5 fixture)")
    parser.add_argument("--full-size", action="store_true",
                        help="use the test rig's full-size SD1.5 UNet recipe (859.5M params, random weights)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (latent = size/8)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: a tiny model only contends with more on a shared CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    nodes = headless.import_comfyui()
    headless.load_pack(nodes)
    import comfy.model_management
    import comfy.sd
    checkpoint = args.checkpoint or rig.tiny_checkpoint_path(full_size=args.full_size)
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False)
    encode = nodes.CLIPTextEncode().encode
    positive, negative = encode(clip, "a photo of a person on a beach")[0], encode(clip, "")[0]
    safety = encode(clip, "nudity, violence, blood")[0]
    sld = nodes.NODE_CLASS_MAPPINGS["SafeLatentGuidance"].execute(
        model, safety, preset="max", warmup_unit="fraction_of_run", sld_guidance_scale=1000.0, sld_warmup_steps=0,
        sld_warmup_fraction=0.0, sld_threshold=0.01, sld_momentum_scale=0.3, sld_mom_beta=0.4,
        fast_batched=False).result[0]
    safe_denoiser = nodes.NODE_CLASS_MAPPINGS["SafeDenoiser"]
    shape = (4, args.size // 8, args.size // 8)

    def patched(count: int, end_percent: float):
        latents = torch.randn(count, *shape, generator=torch.Generator().manual_seed(count)) * 5.0
        negation_set = NegationSet(latents=latents, source=f"bench: {count} random latents")
        return safe_denoiser.execute(model, negation_set, strength=0.33, start_percent=0.0, end_percent=end_percent,
                                     bandwidth=3.15).result[0]

    variants = {
        "plain CFG": model,
        "SLD (separate safety pass)": sld,
        "SafeDenoiser N=25, every step": patched(25, 1.0),
        "SafeDenoiser N=250, every step": patched(250, 1.0),
        "SafeDenoiser N=250, window 0-0.2": patched(250, 0.2),
    }
    latent = {"samples": torch.zeros(args.batch, *shape)}
    device = comfy.model_management.get_torch_device()

    def sample(variant) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        nodes.common_ksampler(variant, 0, args.steps, 7.5, args.sampler, "normal", positive, negative, latent,
                              disable_noise=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for variant in variants.values():  # warm-up: model load, kernels, allocator
        sample(variant)
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, variant in variants.items():
            times[name].append(sample(variant))

    plain = statistics.median(times["plain CFG"])
    with_sld = statistics.median(times["SLD (separate safety pass)"])
    print(f"checkpoint {os.path.basename(checkpoint)}, device {device}, {args.steps} steps {args.sampler}, "
          f"{args.size}px, batch {args.batch}, median of {args.repeats}")
    print(f"{'variant':34s} {'median s':>9s} {'vs CFG':>7s} {'vs SLD':>7s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:34s} {median:9.3f} {median / plain:6.2f}x {median / with_sld:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
