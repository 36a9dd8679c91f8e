"""Cost of SafeLatentGuidance relative to plain CFG, measured side by side in one run: time and peak memory.

    python -m bench.sld_overhead                       # tiny random SD1.5 checkpoint, CPU or GPU
    python -m bench.sld_overhead --full-size --size 512 --steps 25          # SD1.5-sized random UNet (GPU)
    python -m bench.sld_overhead --checkpoint PATH --size 512 --steps 25    # a real checkpoint

Samples the same seed with the stock KSampler three ways: plain CFG, SLD as the node's default sets it up
(uncond, prompt and safety concept in one batched model call), and SLD with fast_batched off (a separate
safety pass). Runs are interleaved (plain, default, separate, plain, ...) so machine load hits all three
alike; the medians and their ratios to plain CFG are printed. The physical floor is 1.5x: three model
evaluations instead of two. Then each variant samples once more while its peak working memory is
measured: the most tensor memory allocated at once during the run, above what was allocated before it
(on CUDA from the allocator's statistics, on a CPU from the profiler's record of every allocation).
"""

from __future__ import annotations

import os
import sys

import torch

from .sampling_rig import SamplingRig, sampling_arguments


def main(argv: list[str] | None = None) -> int:
    args = sampling_arguments("python -m bench.sld_overhead", __doc__.split("\n\n")[0]).parse_args(argv)
    bench = SamplingRig(args)
    model, device, checkpoint = bench.model, bench.device, bench.checkpoint
    import comfy.model_management
    variants = {"plain CFG": model, **sld_variants(bench)}
    medians = bench.median_times(variants)
    memory = {name: peak_working_memory(device, bench.sample, patched) for name, patched in variants.items()}

    plain = medians["plain CFG"]
    print(f"checkpoint {os.path.basename(checkpoint)}, device {device}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps {args.sampler}, {args.size}px, batch {args.batch}, median of {args.repeats}")
    print(f"{'variant':40s} {'median s':>9s} {'ratio':>7s} {'peak MiB':>9s}")
    for name, median in medians.items():
        print(f"{name:40s} {median:9.3f} {median / plain:6.2f}x {memory[name] / 2**20:9.1f}")
    print("floor 1.50x (3 model evaluations instead of 2); target for the default path <= 1.55x")
    estimate = {n: model.model.memory_required([n * args.batch, 4, args.size // 8, args.size // 8]) / 2**20
                for n in (2, 3)}
    print(f"ComfyUI's calc_cond_batch batches the 3 conds only while 1.5x its estimate fits in free memory, else runs "
          f"them one at a time: estimate {estimate[2]:.0f} MiB for 2 conds, {estimate[3]:.0f} MiB for 3; free now "
          f"{comfy.model_management.get_free_memory(device) / 2**20:.0f} MiB")
    return 0


def sld_variants(bench) -> dict:
    """{name: MODEL}: SLD (preset max) as the node's default sets it up, and with a separate safety pass."""
    sld = bench.nodes.NODE_CLASS_MAPPINGS["SafeLatentGuidance"]
    settings = dict(preset="max", warmup_unit="fraction_of_run", sld_guidance_scale=1000.0, sld_warmup_steps=0,
                    sld_warmup_fraction=0.0, sld_threshold=0.01, sld_momentum_scale=0.3, sld_mom_beta=0.4)
    default = next(i.default for i in sld.define_schema().inputs if i.id == "fast_batched")
    return {
        f"SLD default (fast_batched {default})": sld.execute(bench.model, bench.safety, **settings,
                                                              fast_batched=default).result[0],
        "SLD separate pass (fast_batched off)": sld.execute(bench.model, bench.safety, **settings,
                                                             fast_batched=False).result[0],
    }


def peak_working_memory(device: torch.device, call, *args) -> int:
    """Bytes of tensor memory ``call(*args)`` holds at its peak above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call(*args)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        call(*args)
    allocations = sorted((e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"),
                         key=lambda e: e.start_ns())
    live = peak = 0
    for event in allocations:  # nbytes < 0 for a free
        live += event.nbytes()
        peak = max(peak, live)
    return peak


if __name__ == "__main__":
    sys.exit(main())
