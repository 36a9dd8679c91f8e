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

import os
import sys

import torch

from implicit_negatives.safe_denoiser import NegationSet

from .sampling_rig import SamplingRig, sampling_arguments


def main(argv: list[str] | None = None) -> int:
    args = sampling_arguments("python -m bench.safe_denoiser_overhead", __doc__.split("\n\n")[0]).parse_args(argv)
    bench = SamplingRig(args)
    model, device, checkpoint, shape = bench.model, bench.device, bench.checkpoint, bench.latent_shape
    sld = bench.nodes.NODE_CLASS_MAPPINGS["SafeLatentGuidance"].execute(
        model, bench.safety, preset="max", warmup_unit="fraction_of_run", sld_guidance_scale=1000.0,
        sld_warmup_steps=0, sld_warmup_fraction=0.0, sld_threshold=0.01, sld_momentum_scale=0.3, sld_mom_beta=0.4,
        fast_batched=False).result[0]
    safe_denoiser = bench.nodes.NODE_CLASS_MAPPINGS["SafeDenoiser"]

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
    medians = bench.median_times(variants)

    plain, with_sld = medians["plain CFG"], medians["SLD (separate safety pass)"]
    print(f"checkpoint {os.path.basename(checkpoint)}, device {device}, {args.steps} steps {args.sampler}, "
          f"{args.size}px, batch {args.batch}, median of {args.repeats}")
    print(f"{'variant':34s} {'median s':>9s} {'vs CFG':>7s} {'vs SLD':>7s}")
    for name, median in medians.items():
        print(f"{name:34s} {median:9.3f} {median / plain:6.2f}x {median / with_sld:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
