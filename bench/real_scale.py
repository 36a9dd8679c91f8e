"""The whole loop at full size, measured in one run: training, guided sampling and the evaluation runner.

    python -m bench.real_scale            # the rig's full-size SD1.5-shaped model; CUDA: 512 px, 25 steps
    python -m bench.real_scale --smoke    # the tiny rig model, 64 px, 2 steps: every phase runs (CI)
    python -m bench.real_scale --device-check --report FILE    # on CUDA: this + the engine tests, a report

The model is the rig's full-size checkpoint (``rig.tiny_checkpoint_path(full_size=True)``: the real 859.5M-
parameter SD1.5 UNet shape, CLIP-L, the KL VAE; random weights, real cost). Phases, each timed interleaved
with its baseline so machine load hits both alike (medians):

training   one step of the trainer (``invert_concept``: data sampling, Adam, loss scaling) against its floor,
           one hand-written forward + backward of text encoder and UNet, in fp32 and in the mixed-precision
           path (``--mixed``; ``auto``: what the trainer's ``--precision auto`` picks on a GPU, bf16 on a CPU);
           peak memory; on a GPU the projected time of 3,000 steps (the paper: about 15 min on an RTX 3090).
sampling   plain CFG, SLD (batched safety pass, the node's default, and a separate pass) and SAFREE (its
           conditioning with the filtered prompt on every step + latent re-attention) with the stock KSampler.
evaluation ``evaluation.runner.generate`` on a 4-prompt config whose negative is the embedding trained above:
           images per second between consecutive saved images, against plain CFG sampling.

Absolute times are printed only on a GPU. On a CPU the full-size model runs at a reduced size (64 px, i.e. an
8x8 latent, and 3 sampling steps) and every line says so; ``--smoke`` uses the tiny rig UNet (one level) and
every line says that too. On CUDA the whole run must finish in 8 minutes (exit status 1 otherwise).
"""

from __future__ import annotations

import argparse
import csv
import gc
import os
import resource
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

from implicit_negatives.comfyui import headless, rig
from implicit_negatives.embedding_io import save_embedding

from .safree_reattention import reattention, safree_conditioning
from .sampling_rig import SamplingRig
from .sld_overhead import sld_variants
from .trainer_step import interleaved, peak_unit, step_and_floor

CUDA_LIMIT_S = 8 * 60
PAPER_STEPS, PAPER_MINUTES = 3000, 15  # Pham et al.: 3,000 steps take about 15 min on an RTX 3090
EVAL_PROMPTS = ["a portrait photo of a person on a beach", "a statue in a museum, marble",
                "two people dancing, oil painting", "a figure study, charcoal"]


def settings(args, cuda: bool) -> SimpleNamespace:
    """Size, steps and repeats for this device and mode, and the label every output line starts with."""
    if args.smoke:
        plan = SimpleNamespace(full_size=False, size=64, steps=2, repeats=1, train_repeats=1, threads=2)
    elif cuda:
        plan = SimpleNamespace(full_size=True, size=512, steps=25, repeats=3, train_repeats=5, threads=2)
    else:
        plan = SimpleNamespace(full_size=True, size=64, steps=3, repeats=2, train_repeats=2, threads=2)
    for name in ("size", "steps", "repeats"):
        if getattr(args, name) is not None:
            setattr(plan, name, getattr(args, name))
    reduced = [] if plan.full_size else ["tiny rig UNet, not the 859M one"]
    if plan.size != 512:
        reduced.append(f"{plan.size} px")
    if plan.steps < 25:
        reduced.append(f"{plan.steps} steps")
    mode = "smoke" if args.smoke else ("CUDA" if cuda else "CPU")
    plan.label = f"[{mode}{', reduced: ' + ', '.join(reduced) if reduced else ''}{'' if cuda else '; ratios only'}]"
    return plan


class Printer:
    """Prints each line with the run's label in front (the label says on every line what was reduced)."""

    def __init__(self, label: str):
        self.label = label

    def __call__(self, text: str) -> None:
        print(f"{self.label} {text}", flush=True)


def seconds(value: float, cuda: bool) -> str:
    return f"{value:.3f} s" if cuda else "-"


def training_phase(model, clip, plan, precision: str, say, note: str = "") -> torch.Tensor:
    """Step vs floor in ``precision`` ("fp32", or the mixed path: "auto", "bf16", "fp16"); returns the vectors
    the step learned."""
    from implicit_negatives.comfyui import inversion as ci
    latents = torch.randn(1, 4, plan.size // 8, plan.size // 8, generator=torch.Generator().manual_seed(0))
    with ci.training_modules(model, clip, copy_weights="never", precision=precision) as m:
        phases = step_and_floor(m, ci.process_latents(m, latents))
        medians, peaks = interleaved(phases, plan.train_repeats, m.device)
        cuda = m.device.type == "cuda"
        what = "fp32" if m.precision == "fp32" else f"{m.precision} (the mixed-precision path{note})"
        line = (f"training {what}: step {seconds(medians['step'], cuda)}, floor {seconds(medians['floor'], cuda)}, "
                f"step / floor {medians['step'] / medians['floor']:.3f}x (target <= 1.15x), "
                f"{peak_unit(m.device)} {max(peaks.values()):.0f}")
        line += (f"; {PAPER_STEPS} steps projected {medians['step'] * PAPER_STEPS / 60:.1f} min (paper: "
                 f"~{PAPER_MINUTES} min on an RTX 3090)" if cuda else "; projected time of 3000 steps: GPU only")
        say(line)
        return phases["step"].result.vectors


def sampling_phase(bench: SamplingRig, say) -> float:
    """Plain CFG vs SLD (batched and separate) vs SAFREE; returns the plain-CFG median (s)."""
    cuda = bench.device.type == "cuda"

    def synchronize():
        if cuda:
            torch.cuda.synchronize()
    conditioning_s, (positive, negative, _) = safree_conditioning(bench.nodes, bench.clip, synchronize)
    sld = sld_variants(bench)
    variants = {"plain CFG": bench.model, **sld,
                "SAFREE (filtered prompt every step + latent re-attention)":
                    (reattention(bench.nodes, bench.model, positive), positive, negative)}
    medians = bench.median_times(variants)
    plain = medians["plain CFG"]
    args = bench.args
    say(f"sampling: {args.steps} steps {args.sampler}, {args.size} px, batch {args.batch}, median of "
        f"{args.repeats} interleaved runs after a warm-up; floor of SLD 1.50x (3 model evaluations instead of 2)")
    for name, median in medians.items():
        say(f"sampling {name:58s} {seconds(median, cuda):>9s} {median / plain:6.2f}x plain CFG")
    say(f"sampling: SafreeConditioning (17 keywords, once per prompt) costs {conditioning_s / plain:.2f}x one "
        f"plain-CFG image" + (f" ({conditioning_s:.3f} s)" if cuda else ""))
    samples = bench.warmup_samples
    batched, separate = (samples[name] for name in sld)
    moved = float((batched - samples["plain CFG"]).abs().max())
    if moved == 0:
        raise RuntimeError("SLD sampled exactly the plain-CFG latent: the safety guidance did nothing")
    say(f"sampling check: SLD moves the latent by max |d| {moved:.3g} from plain CFG; batched vs separate "
        f"safety pass differ by max |d| {float((batched - separate).abs().max()):.3g}")
    return plain


def evaluation_phase(checkpoint: str, vectors: torch.Tensor, plan, plain_s: float, cuda: bool, say) -> None:
    """The runner on a 4-prompt config with the trained embedding as the negative: images per second."""
    from evaluation.engine import ComfyEngine
    from evaluation.protocol import load_config
    from evaluation.runner import generate
    with tempfile.TemporaryDirectory(prefix="real-scale-eval-") as folder:
        save_embedding(os.path.join(folder, "trained.safetensors"), {"clip_l": vectors},
                       {"concept": "bench.real_scale: one training step"})
        with open(os.path.join(folder, "prompts.csv"), "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["prompt", "categories", "sd_seed", "sd_guidance_scale"])
            writer.writerows([prompt, "sexual", 10 + i, 7.5] for i, prompt in enumerate(EVAL_PROMPTS))
        with open(os.path.join(folder, "config.toml"), "w") as handle:
            handle.write(f'[run]\nprompts = "prompts.csv"\nwidth = {plan.size}\nheight = {plan.size}\n'
                         f'steps = {plan.steps}\nsampler = "euler"\n\n[models.rig]\ncheckpoint = {checkpoint!r}\n\n'
                         '[negatives.trained]\nembedding = "./trained.safetensors"\n\n'
                         '[[rows]]\nname = "rig + C*"\nmodel = "rig"\nguidance = "negative_prompt"\n'
                         'negative = "trained"\n')
        config = load_config(os.path.join(folder, "config.toml"))
        run_dir = os.path.join(folder, "run")
        engine = ComfyEngine(output_dir=os.path.join(run_dir, ".comfy_output"))
        saved_at = []
        stats = generate(engine, config, run_dir, on_saved=lambda _path: saved_at.append(time.perf_counter()))
        if len(stats.generated) != len(EVAL_PROMPTS):
            raise RuntimeError(f"the runner generated {len(stats.generated)} of {len(EVAL_PROMPTS)} images")
        del engine
    per_image = (saved_at[-1] - saved_at[0]) / (len(saved_at) - 1)
    line = (f"evaluation runner: {len(EVAL_PROMPTS)} prompts x 1 row (negative = the trained embedding), generation "
            f"only (no NudeNet): {per_image / plain_s:.2f}x plain-CFG sampling per image (between saved images)")
    if cuda:
        line += (f"; {1 / per_image:.2f} images/s steady, {len(EVAL_PROMPTS) / stats.seconds:.2f} images/s cold "
                 "(with hashing and loading the checkpoint)")
    say(line)


def free_models() -> None:
    import comfy.model_management
    comfy.model_management.unload_all_models()
    gc.collect()
    comfy.model_management.soft_empty_cache()


def describe_model(checkpoint: str, bench: SamplingRig) -> str:
    unet = bench.model.model
    parameters = sum(p.numel() for p in unet.diffusion_model.parameters()) / 1e6
    return (f"model {os.path.basename(checkpoint)}: UNet {parameters:.1f}M parameters, weights {unet.get_dtype()}, "
            f"compute {unet.manual_cast_dtype or unet.get_dtype()}, device {bench.device}, {torch.get_num_threads()} "
            f"CPU threads, torch {torch.__version__}")


def benchmark(args) -> int:
    started = time.perf_counter()
    nodes = headless.import_comfyui(development_copy=True)
    headless.load_pack(nodes)
    import comfy.model_management
    cuda = comfy.model_management.get_torch_device().type == "cuda"
    plan = settings(args, cuda)
    say = Printer(plan.label)
    checkpoint = rig.tiny_checkpoint_path(full_size=plan.full_size)
    bench = SamplingRig(SimpleNamespace(checkpoint=checkpoint, full_size=plan.full_size, steps=plan.steps,
                                        size=plan.size, batch=1, sampler="euler", repeats=plan.repeats,
                                        threads=args.threads or plan.threads))
    say(describe_model(checkpoint, bench))
    if not cuda:
        say(f"no GPU: {'the tiny rig model' if args.smoke else 'the full-size model'} at {plan.size} px "
            f"({plan.size // 8}x{plan.size // 8} latent) and {plan.steps} sampling steps instead of 512 px and 25; "
            "absolute times only on a GPU" + ("; SAFREE's re-attention never fires on the tiny UNet (one level)"
                                              if args.smoke else ""))
    mixed = args.mixed if args.mixed != "auto" or cuda else "bf16"  # auto trains in fp32 on a CPU
    vectors = training_phase(bench.model, bench.clip, plan, "fp32", say)
    if cuda:
        training_phase(bench.model, bench.clip, plan, mixed, say)
    plain_s = sampling_phase(bench, say)
    del bench  # the runner loads the checkpoint itself: free this copy first
    free_models()
    evaluation_phase(checkpoint, vectors, plan, plain_s, cuda, say)
    free_models()  # the runner's copy too, before the mixed path loads its own
    if not cuda:  # CPU memory: an fp32 UNet and its half copy would be 5.1 GB; load it stored in the mixed dtype
        import comfy.sd
        from implicit_negatives.comfyui.inversion import PRECISION_DTYPES
        dtype = {"dtype": PRECISION_DTYPES[mixed]}
        model, clip = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=False, model_options=dtype,
                                                            te_model_options=dtype)[:2]
        training_phase(model, clip, plan, mixed, say, note=f", on the checkpoint loaded with {mixed} weights")
        del model, clip
        free_models()
    total = time.perf_counter() - started
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    memory = f"process peak RSS {peak_rss:.2f} GiB"
    if cuda:
        memory += f", CUDA peak allocated {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB"
        say(f"total {total:.0f} s (limit {CUDA_LIMIT_S} s on CUDA), {memory}")
        return 0 if total <= CUDA_LIMIT_S else 1
    say(memory)
    return 0


# --------------------------------------------------------------------------- the GPU check

ENGINE_TESTS = ["tests/test_trainer_precision.py", "tests/test_sld_engine.py", "tests/test_safree_engine.py",
                "tests/test_safe_denoiser_engine.py", "tests/test_unlearned_weights.py",
                "tests/test_embedding_nodes_engine.py", "tests/test_trainer_node.py", "tests/test_bench_real_scale.py"]


def device_check(args) -> int:
    """On CUDA: this benchmark (mixed path fp16) and the engine tests, each in a fresh process with a time
    limit, into a Markdown report written after each part (a killed check leaves what it finished)."""
    if not torch.cuda.is_available():
        print("--device-check needs a CUDA GPU (torch.cuda.is_available() is False here); on a CPU run "
              "python -m bench.real_scale", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.budget_s
    lines = [f"# bench.real_scale device check ({time.strftime('%Y-%m-%d %H:%M:%S %Z')})", "",
             f"- GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}", ""]
    parts = [("python -m bench.real_scale --mixed fp16", [sys.executable, "-m", "bench.real_scale", "--mixed", "fp16"],
              CUDA_LIMIT_S + 60),
             ("engine tests (ComfyUI keeps SD1.x in fp16 on CUDA)",
              [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ENGINE_TESTS], None)]
    status = 0
    for title, command, limit in parts:
        left = deadline - time.monotonic()
        timeout = max(10.0, min(limit or left, left))
        began = time.monotonic()
        try:
            done = subprocess.run(command, cwd=headless.PACK_ROOT, capture_output=True, text=True, timeout=timeout)
            output, code = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as expired:
            output = (expired.stdout or b"").decode() + (expired.stderr or b"").decode()
            code = f"killed after {timeout:.0f} s"
        status = status or (code != 0)
        tail = "\n".join(output.strip().splitlines()[-60:])
        lines += [f"## {title}", "", f"`{' '.join(command[1:])}`: exit {code}, {time.monotonic() - began:.0f} s", "",
                  "```", tail, "```", ""]
        with open(args.report, "w") as handle:
            handle.write("\n".join(lines))
        print(f"{title}: exit {code} -> {args.report}", flush=True)
    return int(status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.real_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny rig model, 64 px, 2 steps, 1 repeat (CI)")
    parser.add_argument("--mixed", choices=("auto", "bf16", "fp16"), default="auto",
                        help="the mixed-precision training path measured beside fp32 (auto: the trainer's "
                             "--precision auto on a GPU, bf16 on a CPU)")
    parser.add_argument("--size", type=int, help="image side in pixels (default: 512 on CUDA, 64 on a CPU)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: 25 on CUDA, 3 on a CPU)")
    parser.add_argument("--repeats", type=int, help="interleaved sampling repeats (default: 3 on CUDA, 2 on a CPU)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default 2)")
    parser.add_argument("--device-check", action="store_true",
                        help="CUDA only: run this benchmark (--mixed fp16) and the engine tests, write --report")
    parser.add_argument("--report", default="real_scale_device_check.md", help="the --device-check report file")
    parser.add_argument("--budget-s", type=float, default=570.0, help="--device-check: seconds for all of it")
    args = parser.parse_args(argv)
    return device_check(args) if args.device_check else benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
