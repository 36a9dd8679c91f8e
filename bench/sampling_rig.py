"""What the sampling benchmarks share: their command line, the model and prompts, and the interleaved timing.

Every variant is a patched MODEL sampled with the stock KSampler on the same seed; runs are interleaved
(a, b, c, a, b, c, ...) so machine load hits all variants alike, and medians are compared.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from implicit_negatives.comfyui import headless, rig


def sampling_arguments(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
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
    return parser


class SamplingRig:
    """ComfyUI with the pack, a checkpoint's MODEL, and the benchmark's positive/negative/safety conditionings."""

    def __init__(self, args):
        torch.set_num_threads(args.threads)
        self.args = args
        self.nodes = headless.import_comfyui(development_copy=True)
        headless.load_pack(self.nodes)
        import comfy.model_management
        import comfy.sd
        self.checkpoint = args.checkpoint or rig.tiny_checkpoint_path(full_size=args.full_size)
        self.model, self.clip, _, _ = comfy.sd.load_checkpoint_guess_config(self.checkpoint, output_vae=False)
        clip = self.clip
        encode = self.nodes.CLIPTextEncode().encode
        self.positive, self.negative = encode(clip, "a photo of a person on a beach")[0], encode(clip, "")[0]
        self.safety = encode(clip, "nudity, violence, blood")[0]
        self.latent_shape = (4, args.size // 8, args.size // 8)
        self.device = comfy.model_management.get_torch_device()

    def sample(self, model, positive=None, negative=None) -> float:
        """Seconds for one KSampler run of ``model`` (CUDA synchronised), with the benchmark's prompts unless
        ``positive`` / ``negative`` are given; the sampled latent is kept in ``last_samples``."""
        latent = {"samples": torch.zeros(self.args.batch, *self.latent_shape)}
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = self.nodes.common_ksampler(model, 0, self.args.steps, 7.5, self.args.sampler, "normal",
                                         positive or self.positive, negative or self.negative, latent,
                                         disable_noise=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.last_samples = out[0]["samples"]
        return seconds

    def median_times(self, variants: dict) -> dict[str, float]:
        """{name: median seconds} over ``--repeats`` interleaved rounds, after one warm-up run of each.

        A variant is a MODEL, or (MODEL, positive, negative) to sample it with its own conditioning. The
        warm-up runs' latents are kept in ``warmup_samples`` ({name: tensor}: same seed for all)."""
        runs = {name: (v if isinstance(v, tuple) else (v,)) for name, v in variants.items()}
        self.warmup_samples = {}
        for name, run in runs.items():  # warm-up: model load, kernels, allocator
            self.sample(*run)
            self.warmup_samples[name] = self.last_samples
        times = {name: [] for name in runs}
        for _ in range(self.args.repeats):
            for name, run in runs.items():
                times[name].append(self.sample(*run))
        return {name: statistics.median(values) for name, values in times.items()}
