"""Cost of one concept-inversion training step relative to its physical floor, measured in one run.

    python -m bench.trainer_step                          # tiny random SD1.5 checkpoint (full CLIP-L), CPU or GPU
    python -m bench.trainer_step --checkpoint PATH --size 512    # a real checkpoint

floor  = one forward + backward (w.r.t. the vectors) of the text encoder and UNet on a fixed batch,
         hand-written: no data sampling, no optimiser, no bookkeeping.
step   = one step of ``invert_concept`` with the trainer's loss (sampling, noise, Adam, progress state).
vae    = the same step plus a VAE encode of the image, i.e. what per-step encoding would cost.
Runs are interleaved (floor, step, vae, floor, ...) so machine load hits all alike; medians and the
ratios step/floor (target <= 1.15x) and vae/step (the speedup of cached latents) are printed, with
peak memory: CUDA max allocated per phase on a GPU, peak RSS above the phase's start on the CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import torch

from implicit_negatives.comfyui import headless, rig


class RssPeak:
    """Peak resident memory above the starting level while a block runs (polled every 2 ms), in MiB."""

    def __enter__(self):
        import psutil
        self.process, self.stop = psutil.Process(), threading.Event()
        self.base = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()
        return self

    def poll(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.mib = (self.peak - self.base) / 2 ** 20


def step_and_floor(m, x0: torch.Tensor, word: str = "person") -> dict:
    """{"floor": fn, "step": fn} for ``TrainingModules`` ``m`` on cached model-space latents ``x0`` (1, 4, h, w):
    the hand-written forward + backward of text encoder and UNet, and one ``invert_concept`` step (its last
    ``InversionResult`` in ``step.result``)."""
    from implicit_negatives.comfyui import inversion as ci
    from implicit_negatives.cfg import eps_from_denoised
    from implicit_negatives.inversion import InversionConfig, denoising_loss, invert_concept
    prompts = [ci.tokenize_caption(m.tokenizer, "a photo of a {}", 1)]
    vectors = ci.init_vectors_from_word(m, word, 1).to(m.device).requires_grad_(True)
    sigma = m.model_sampling.sigma(torch.tensor([500.0])).to(m.device)
    noise = torch.randn_like(x0).to(m.device)
    x_t = m.model_sampling.noise_scaling(sigma, noise, x0.to(m.device))

    def floor():
        with torch.autocast(m.device.type, dtype=m.autocast_dtype, enabled=m.autocast_dtype is not None):
            context, _ = m.encoder([ci.prompt_row(prompts[0], vectors, m.tokenizer)])
            denoised = m.base_model.apply_model(x_t, sigma, c_crossattn=context)
        torch.autograd.grad(denoising_loss(eps_from_denoised(x_t, denoised.float(), sigma), noise), [vectors])

    config = InversionConfig(steps=1)
    sampler = ci.latent_batch_sampler(x0, m.model_sampling, [[0]], config)
    loss_fn = ci.make_loss_fn(m, prompts, sampler)
    init = vectors.detach().cpu()

    def step():
        step.result = invert_concept(loss_fn, init, config, loss_scale=m.loss_scale)
        if not all(torch.isfinite(torch.tensor(step.result.losses))):
            raise RuntimeError(f"the {m.precision} training step gave a non-finite loss: {step.result.losses}")
    return {"floor": floor, "step": step}


def interleaved(phases: dict, repeats: int, device: torch.device) -> tuple[dict, dict]:
    """({name: median seconds}, {name: peak MiB}) over ``repeats`` interleaved rounds after one warm-up of each;
    peak: CUDA max allocated during the phase on a GPU, peak RSS above the phase's start on the CPU."""
    times = {k: [] for k in phases}
    peaks = {}
    for fn in phases.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in phases.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            with RssPeak() as rss:
                started = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - started)
            peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else rss.mib
            peaks[name] = max(peaks.get(name, 0.0), peak)
    return {k: statistics.median(v) for k, v in times.items()}, peaks


def peak_unit(device: torch.device) -> str:
    return "CUDA peak MiB" if device.type == "cuda" else "peak RSS above start MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.trainer_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="SD1.x checkpoint (default: the tiny random SD1.5 fixture)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    headless.load_pack(headless.import_comfyui(development_copy=True))
    from implicit_negatives.comfyui import inversion as ci
    import comfy.sd

    checkpoint = args.checkpoint or rig.tiny_checkpoint_path()
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(checkpoint)
    image = torch.rand(1, args.size, args.size, 3, generator=torch.Generator().manual_seed(0))
    latents = ci.encode_images(vae, image)
    with ci.training_modules(model, clip, copy_weights="never") as m:
        phases = step_and_floor(m, ci.process_latents(m, latents))

        def step_with_vae():
            ci.encode_images(vae, image)
            phases["step"]()

        phases["vae"] = step_with_vae
        median, peaks = interleaved(phases, args.repeats, m.device)
    unit = peak_unit(m.device)
    print(f"device {m.device}, {args.size} px, {os.path.basename(checkpoint)}, {args.repeats} interleaved repeats")
    for name in phases:
        print(f"  {name:5s} median {median[name]:.3f} s   {unit} {peaks[name]:.0f}")
    print(f"step / floor = {median['step'] / median['floor']:.3f}x (target <= 1.15x)")
    print(f"cached latents speedup (per-step VAE encode / cached) = {median['vae'] / median['step']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
