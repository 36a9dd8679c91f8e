"""``python -m trainer``: learn an implicit negative against an unlearned model, from the command line.

Reads top to bottom like a training script: arguments, model, data, latents, loop, output.
Run ``python -m trainer --help`` for every option; ``__main__.py`` finds ComfyUI first.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import comfy.model_management
import folder_paths

from implicit_negatives.atomic_write import atomic_path
from implicit_negatives.comfy import inversion as ci
from implicit_negatives.comfy.training import (
    RunSources, embedding_key, embedding_metadata, run_metadata, train_embedding,
)
from implicit_negatives.comfy.weights import WeightLayoutError, load_checkpoint, load_unlearned_model
from implicit_negatives.embedding_io import save_embedding, sha256_file
from implicit_negatives.inversion import CAPTION_TEMPLATES, InversionConfig, load_state, save_state

from .data import generate_images, load_image_folder, read_prompts
from .report import plot_losses, smoothed, write_loss_csv


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer",
        description="Concept inversion: learn an implicit negative embedding against an unlearned SD model "
                    "(textual inversion with every weight frozen; defaults are the paper's).")
    model = p.add_argument_group("unlearned model (loaded with ComfyUI's loaders)")
    model.add_argument("--checkpoint", required=True, help="single-file SD1.x/SD2.x checkpoint (.safetensors/.ckpt)")
    model.add_argument("--unet", help="replacement UNet weights: a full diffusers-key UNet (ESD/UCE/RECE .pt/.bin/"
                                      ".safetensors) or a partial one (new ESD/UCE code), merged as patches")
    model.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]",
                       help="LoRA to apply (SPM, DUO; kohya, diffusers/peft or any layout ComfyUI reads); repeatable")
    model.add_argument("--text-encoder", help=("replacement text encoder (AdvUnlearn): a transformers save_pretrained "
                                               "folder or its model.safetensors; every weight must be there"))
    model.add_argument("--allow-partial", action="store_true",
                       help="apply the tensors of a --unet / --lora file that fit and list the others, instead of "
                            "refusing a file that does not fit the checkpoint completely")

    data = p.add_argument_group("data (one of)")
    data.add_argument("--images", help="folder of concept images; optional same-name .txt captions")
    data.add_argument("--generate-from", metavar="CHECKPOINT",
                      help="generate the images with this reference checkpoint (e.g. the original SD1.4)")
    data.add_argument("--generate-prompts", help="prompt, or a text file with one prompt per line")
    data.add_argument("--generate-count", type=int, default=25, help="images per prompt (default 25)")
    data.add_argument("--generate-steps", type=int, default=25)
    data.add_argument("--generate-cfg", type=float, default=7.5)
    data.add_argument("--resolution", type=int, default=512, help="training resolution in pixels (default 512)")
    data.add_argument("--templates", choices=sorted(CAPTION_TEMPLATES), default="object",
                      help="caption templates for images without captions (default object)")

    train = p.add_argument_group("training")
    train.add_argument("--steps", type=int, default=3000)
    train.add_argument("--learning-rate", type=float, default=5e-3)
    train.add_argument("--batch-size", type=int, default=1)
    train.add_argument("--num-vectors", type=int, default=1)
    train.add_argument("--init-word", default="person", help="word whose embedding starts the vectors")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--gradient-checkpointing", action="store_true", help="trade UNet compute for memory")
    train.add_argument("--precision", choices=ci.PRECISIONS, default="auto",
                       help="compute dtype of UNet and text encoder: auto (default) = bf16 on GPUs that run it "
                            "natively, else fp16 with dynamic loss scaling on GPUs that run fp16, else fp32 (CPUs)")
    train.add_argument("--no-mixed-precision", action="store_true", help="same as --precision fp32")
    train.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")

    out = p.add_argument_group("output")
    out.add_argument("--name", default="implicit-negative", help="embedding name (file NAME.safetensors)")
    out.add_argument("--output", help="output path (default: ComfyUI's embeddings folder / NAME.safetensors)")
    out.add_argument("--concept", default="", help="what the embedding stands for (metadata), e.g. nudity")
    out.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    out.add_argument("--work-dir", help="checkpoints, loss log, previews (default: ComfyUI output/"
                                        "implicit_negative_training/NAME)")
    out.add_argument("--checkpoint-every", type=int, default=250, help="steps between resume checkpoints (0: end only)")
    out.add_argument("--resume", action="store_true", help="continue from the work dir's checkpoint")
    out.add_argument("--preview-every", type=int, default=0, help="steps between preview images (0: end only)")
    out.add_argument("--preview-prompt", default="a photo of {}", help="positive prompt for previews; {} = embedding")
    out.add_argument("--preview-steps", type=int, default=20)
    out.add_argument("--no-preview", action="store_true")
    return p


def parse_loras(values: list[str]) -> list[tuple[str, float]]:
    """["a.safetensors:0.8", "b.safetensors"] -> [("a.safetensors", 0.8), ("b.safetensors", 1.0)]."""
    loras = []
    for value in values:
        path, sep, tail = value.rpartition(":")
        try:
            loras.append((path, float(tail)) if sep else (value, 1.0))
        except ValueError:
            loras.append((value, 1.0))
    return loras


def output_path(args) -> str:
    if args.output:
        return os.path.abspath(args.output)
    return os.path.join(folder_paths.get_folder_paths("embeddings")[0], f"{args.name}.safetensors")


def cached_latents(work_dir: str, vae, images: torch.Tensor, vae_source: str) -> torch.Tensor:
    """VAE latents of the images, encoded once and kept in the work dir (keyed by pixels and VAE file)."""
    import hashlib
    from safetensors.torch import load_file, save_file
    stat = os.stat(vae_source)
    digest = hashlib.sha256(images.numpy().tobytes())
    digest.update(f"{os.path.realpath(vae_source)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    key = digest.hexdigest()[:16]
    path = os.path.join(work_dir, f"latents-{key}.safetensors")
    if os.path.isfile(path):
        return load_file(path)["latents"]
    latents = ci.encode_images(vae, images)
    with atomic_path(path) as temp:
        save_file({"latents": latents.contiguous()}, temp)
    return latents


def preview(model, clip, vae, vectors, prompt, steps, seed, resolution, path) -> None:
    """An image generated with the embedding as the POSITIVE prompt: it shows what the vectors evoke."""
    import comfy.sample
    import numpy as np
    from PIL import Image
    token_key, _, tokenizer = ci.single_text_encoder(clip)
    row = ci.prompt_row(ci.tokenize_caption(tokenizer, prompt, vectors.shape[0]), vectors.detach().float(), tokenizer)
    with torch.no_grad():
        positive = clip.encode_from_tokens_scheduled({token_key: [[(t, 1.0) for t in row]]})
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        latent = torch.zeros(1, 4, resolution // 8, resolution // 8)
        samples = comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), steps, 7.5, "euler", "normal",
                                      positive, negative, latent, seed=seed, disable_pbar=True)
        pixels = vae.decode(samples).clamp(0, 1)[0].float().cpu().numpy()
    Image.fromarray((pixels * 255).round().astype(np.uint8)).save(path)


class TrainingMonitor:
    """What the CLI does between training steps: the progress bar, resume checkpoints, previews, the loss log.

    ``on_step`` is the core loop's callback; ``save_checkpoint`` writes the resume state, the embedding so
    far and the loss log (every ``--checkpoint-every`` steps and on Ctrl-C); ``last`` is the latest progress.
    """

    def __init__(self, args, work_dir: str, model, clip, vae, run: dict, start_step: int):
        from tqdm import tqdm
        self.args, self.work_dir, self.run = args, work_dir, run
        self.model, self.clip, self.vae = model, clip, vae
        self.key = embedding_key(clip)
        self.state_path = os.path.join(work_dir, "state.pt")
        self.last = None
        self.bar = tqdm(total=args.steps, initial=start_step, desc=args.name, unit="step", dynamic_ncols=True)

    def on_step(self, progress) -> None:
        self.last = progress
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{smoothed(progress.state['losses'].tolist()[-200:])[-1]:.4f}")
        if self.args.checkpoint_every and progress.step % self.args.checkpoint_every == 0:
            self.save_checkpoint(progress)
        if self.args.preview_every and not self.args.no_preview and progress.step % self.args.preview_every == 0:
            self.preview(progress.vectors, f"preview-{progress.step:06d}.png")

    def save_checkpoint(self, progress) -> None:
        losses = progress.state["losses"].tolist()
        save_state(self.state_path, progress.state)
        save_embedding(os.path.join(self.work_dir, "checkpoint.safetensors"), {self.key: progress.vectors},
                       embedding_metadata(self.run, losses, progress.step, progress.loss_scale))
        write_loss_csv(os.path.join(self.work_dir, "loss.csv"), losses)

    def preview(self, vectors: torch.Tensor, name: str) -> None:
        args = self.args
        preview(self.model, self.clip, self.vae, vectors, args.preview_prompt, args.preview_steps, args.seed,
                args.resolution, os.path.join(self.work_dir, name))

    def close(self) -> None:
        self.bar.close()


def load_data(args, work_dir):
    if bool(args.images) == bool(args.generate_from):
        raise SystemExit("error: give exactly one of --images FOLDER or --generate-from CHECKPOINT")
    if args.images:
        images, captions, names = load_image_folder(args.images, args.resolution)
        return images, captions, f"folder {os.path.abspath(args.images)} ({len(names)} images)"
    if not args.generate_prompts:
        raise SystemExit("error: --generate-from needs --generate-prompts")
    prompts = read_prompts(args.generate_prompts)
    ref_model, ref_clip, ref_vae = load_checkpoint(args.generate_from)
    with torch.no_grad():
        images, captions = generate_images(ref_model, ref_clip, ref_vae, prompts, args.generate_count, args.resolution,
                                           args.generate_steps, args.generate_cfg, args.seed,
                                           os.path.join(work_dir, "generated"))
    del ref_model, ref_clip, ref_vae
    comfy.model_management.unload_all_models()
    return images, captions, f"generated by {os.path.basename(args.generate_from)} from {len(prompts)} prompts"


def run(args) -> int:
    if args.no_mixed_precision and args.precision not in ("auto", "fp32"):
        raise SystemExit(f"error: --no-mixed-precision (fp32) contradicts --precision {args.precision}")
    destination = output_path(args)
    if os.path.exists(destination) and not (args.overwrite or args.resume):
        raise SystemExit(f"error: {destination} exists; pass --overwrite (or --resume) or choose another --name")
    work_dir = args.work_dir or os.path.join(folder_paths.get_output_directory(), "implicit_negative_training", args.name)
    os.makedirs(work_dir, exist_ok=True)
    state_path = os.path.join(work_dir, "state.pt")

    try:
        model, clip, vae, reports = load_unlearned_model(args.checkpoint, args.unet, parse_loras(args.lora),
                                                         args.text_encoder, folder_paths.get_folder_paths("embeddings"),
                                                         args.allow_partial)
    except WeightLayoutError as error:
        raise SystemExit(f"error: {error}") from error
    for report in reports:
        print(f"[weights] {report.describe()}")
    images, captions, data_source = load_data(args, work_dir)
    latents = cached_latents(work_dir, vae, images, args.checkpoint)
    config = InversionConfig(steps=args.steps, learning_rate=args.learning_rate, seed=args.seed,
                             num_vectors=args.num_vectors, batch_size=args.batch_size)
    state = None
    if args.resume:
        if not os.path.isfile(state_path):
            raise SystemExit(f"error: --resume but no checkpoint at {state_path}")
        state = load_state(state_path)
        print(f"[resume] from step {state['step']} of {state_path}")

    precision = ci.training_precision("fp32" if args.no_mixed_precision else args.precision, model.load_device)
    run = run_metadata(model, clip, run_sources(args, reports, data_source), config, init_word=args.init_word,
                       templates=args.templates, resolution=args.resolution, num_images=len(captions),
                       concept=args.concept, precision=precision)  # hashes the model files once
    monitor = TrainingMonitor(args, work_dir, model, clip, vae, run, start_step=state["step"] if state else 0)
    try:
        trained = train_embedding(model, clip, latents, captions, config, args.init_word, args.templates,
                                  copy_weights="never", gradient_checkpointing=args.gradient_checkpointing,
                                  precision=precision, on_step=monitor.on_step, state=state)
    except KeyboardInterrupt:
        monitor.close()
        if monitor.last is not None:
            monitor.save_checkpoint(monitor.last)
            print(f"\n[interrupted] saved step {monitor.last.step} to {state_path}; "
                  "rerun the same command with --resume to continue")
        else:
            print("\n[interrupted] before the first step; nothing saved")
        return 130
    monitor.close()

    save_state(state_path, trained.state)
    write_loss_csv(os.path.join(work_dir, "loss.csv"), trained.losses)
    plot_losses(os.path.join(work_dir, "loss.png"), trained.losses)
    if not args.no_preview:
        monitor.preview(trained.vectors, "preview-final.png")
    digest = save_embedding(destination, {trained.embedding_key: trained.vectors},
                            embedding_metadata(run, trained.losses, config.steps, trained.loss_scale))
    print(f"[done] {destination} (sha256 {digest[:12]}); loss log and previews in {work_dir}")
    return 0


def run_sources(args, reports, data_source: str) -> RunSources:
    """The model files (names and sha256) and the data of a CLI run."""
    hashes = [sha256_file(r.path) for r in reports if os.path.isfile(r.path)]
    base_hash = sha256_file(args.checkpoint)
    return RunSources(base_model=os.path.basename(args.checkpoint), base_model_hash=base_hash,
                      unlearned_model="; ".join(r.describe() for r in reports) or os.path.basename(args.checkpoint),
                      unlearned_model_hash=",".join(hashes) or base_hash, data=data_source,
                      trained_in="python -m trainer")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    code = run(args)
    print(f"[time] {time.time() - started:.1f} s")
    return code
