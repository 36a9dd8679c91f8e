"""``python -m trainer``: learn an implicit negative against an unlearned model, from the command line.

Reads top to bottom like a training script: arguments, checks (settings, model files, the work folder's
locks and run record, every image) before anything heavy, then data, model, latents, loop, output.
Run ``python -m trainer --help`` for every option; ``__main__.py`` finds ComfyUI first.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

import torch

import comfy.model_management
import folder_paths

from implicit_negatives.atomic_write import atomic_path
from implicit_negatives.comfyui import inversion as ci
from implicit_negatives.comfyui.negation_sets import export_negation_set, pixel_hashes
from implicit_negatives.comfyui.training import (
    RunSources, check_settings, embedding_metadata, run_metadata, train_embedding,
)
from implicit_negatives.comfyui.training_feedback import PREVIEW_PROMPT, PREVIEW_STEPS, preview_image, smoothed, to_pil
from implicit_negatives.comfyui.weights import WeightLayoutError, load_checkpoint, load_unlearned_model
from implicit_negatives.embedding_io import save_embedding, sha256_file
from implicit_negatives.image_folder import ImageFolder, TrainingDataError, load_image_folder
from implicit_negatives.inversion import CAPTION_TEMPLATES, InversionConfig, save_state
from implicit_negatives.negation_set_io import negation_set_path
from implicit_negatives.run_lock import RunLockedError
from implicit_negatives.safe_denoiser import NegationSetError

from .data import generate_images, read_prompts
from .report import plot_losses, write_loss_csv
from .workdir import claimed, default_work_dir, open_run, sha256_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer",
        description="Concept inversion: learn an implicit negative embedding against an unlearned SD model "
                    "(textual inversion with every weight frozen; defaults are the paper's).")
    model = p.add_argument_group("unlearned model (loaded with ComfyUI's loaders)")
    model.add_argument("--checkpoint", required=True,
                       help="single-file SD1.x/SD2.x/SDXL checkpoint (.safetensors/.ckpt): a path, or a file name in "
                            "ComfyUI's models/checkpoints (likewise --unet in diffusion_models, --lora in loras, "
                            "--text-encoder in text_encoders)")
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
    data.add_argument("--images", help="folder of concept images; optional same-name .txt captions (UTF-8)")
    data.add_argument("--training-prompts", metavar="FILE",
                      help="the prompts that generated the --images, one per line: their hashes go into the "
                           "embedding's metadata, so an evaluation on the same prompts is flagged (leakage); "
                           "PNG prompt metadata of ComfyUI or A1111 is read without it")
    data.add_argument("--skip-bad-images", action="store_true",
                      help="train without the images that cannot be used (unreadable, too small, caption not "
                           "UTF-8), listed by name, instead of stopping")
    data.add_argument("--generate-from", metavar="CHECKPOINT",
                      help="generate the images with this reference checkpoint (e.g. the original SD1.4)")
    data.add_argument("--generate-prompts", metavar="FILE", help="text file with one prompt per line (must exist)")
    data.add_argument("--generate-prompt", action="append", default=[], metavar="TEXT",
                      help="a prompt given literally; repeatable (added after the file's prompts)")
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
    out.add_argument("--export-negation-set", action="store_true",
                     help="also write the training images' VAE latents, with their hashes, the VAE fingerprint and "
                          "the resolution, as NAME.negation_set.safetensors next to the output: the negation set "
                          "for SafeDenoiser (LoadNegationSet), so one run yields both negatives")
    out.add_argument("--work-dir", help="checkpoints, loss log, previews (default: ComfyUI output/"
                                        "implicit_negative_training/<output name>-<hash of the output path>)")
    out.add_argument("--checkpoint-every", type=int, default=250, help="steps between resume checkpoints (0: end only)")
    out.add_argument("--resume", action="store_true",
                     help="continue the run in the work dir (refused if models, data or settings changed)")
    out.add_argument("--restart", action="store_true", help="discard the work dir's progress and start over")
    out.add_argument("--preview-every", type=int, default=0, help="steps between preview images (0: end only)")
    out.add_argument("--preview-prompt", default=PREVIEW_PROMPT, help="positive prompt for previews; {} = embedding")
    out.add_argument("--preview-steps", type=int, default=PREVIEW_STEPS)
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
    """An image generated with the embedding as the POSITIVE prompt (``preview_image``), saved as a PNG."""
    image = to_pil(preview_image(model, clip, vae, vectors, prompt, steps, seed, resolution))
    with atomic_path(path) as temp:
        image.save(temp, format="PNG")


class TrainingMonitor:
    """What the CLI does between training steps: the progress bar, resume checkpoints, previews, the loss log.

    ``on_step`` is the core loop's callback; ``save_checkpoint`` writes the resume state, the embedding so
    far and the loss log (every ``--checkpoint-every`` steps and on Ctrl-C); ``last`` is the latest progress.
    """

    def __init__(self, args, work_dir: str, model, clip, vae, run: dict, start_step: int):
        from tqdm import tqdm
        self.args, self.work_dir, self.run = args, work_dir, run
        self.model, self.clip, self.vae = model, clip, vae
        self.parts = ci.text_encoders(clip)
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
        save_embedding(os.path.join(self.work_dir, "checkpoint.safetensors"), ci.split_vectors(self.parts, progress.vectors),
                       embedding_metadata(self.run, losses, progress.step, progress.loss_scale))
        write_loss_csv(os.path.join(self.work_dir, "loss.csv"), losses)

    def preview(self, vectors: torch.Tensor, name: str) -> None:
        args = self.args
        preview(self.model, self.clip, self.vae, vectors, args.preview_prompt, args.preview_steps, args.seed,
                args.resolution, os.path.join(self.work_dir, name))

    def close(self) -> None:
        self.bar.close()


MODEL_FOLDERS = {"checkpoint": "checkpoints", "unet": "diffusion_models", "lora": "loras",
                 "text_encoder": "text_encoders", "generate_from": "checkpoints"}


def resolve_model_file(value: str, option: str) -> str:
    """``value`` as a path when it exists, else the file of that name in ComfyUI's folder for ``option``."""
    if os.path.exists(value):
        return os.path.abspath(value)
    folder = MODEL_FOLDERS[option]
    found = folder_paths.get_full_path(folder, value)
    if found is None:
        raise SystemExit(f"error: --{option.replace('_', '-')} {value}: no such file, neither as a path nor in "
                         f"ComfyUI's {folder} folders ({', '.join(folder_paths.get_folder_paths(folder))})")
    return found


def read_data(args) -> tuple[ImageFolder | None, list[str]]:
    """The image folder, read and checked (or the prompts to generate from), before any model loads."""
    if bool(args.images) == bool(args.generate_from):
        raise SystemExit("error: give exactly one of --images FOLDER or --generate-from CHECKPOINT")
    if args.images:
        folder = load_image_folder(args.images, args.resolution, skip_bad=args.skip_bad_images)
        print(f"[data] {args.images}: {folder.receipt()}")
        return folder, []
    prompts = (read_prompts(args.generate_prompts) if args.generate_prompts else []) + args.generate_prompt
    if not prompts:
        raise SystemExit("error: --generate-from needs --generate-prompts FILE or --generate-prompt TEXT")
    return None, prompts


def generate_data(args, prompts: list[str], work_dir: str):
    ref_model, ref_clip, ref_vae = load_checkpoint(args.generate_from)
    with torch.no_grad():
        images, captions = generate_images(ref_model, ref_clip, ref_vae, prompts, args.generate_count, args.resolution,
                                           args.generate_steps, args.generate_cfg, args.seed,
                                           os.path.join(work_dir, "generated"))
    del ref_model, ref_clip, ref_vae
    comfy.model_management.unload_all_models()
    print(f"[data] generated {len(captions)} images from {len(prompts)} prompts")
    return images, captions, f"generated by {os.path.basename(args.generate_from)} from {len(prompts)} prompts"


def run_inputs(args, hashes: dict, loras, folder: ImageFolder | None, prompts: list[str], precision: str) -> dict:
    """What defines a run, for its work folder's fingerprint: models, data, templates, hyper-parameters and
    the precision it trains in (as resolved on this device: "auto" can mean bf16 here and fp32 elsewhere)."""
    inputs = {
        "checkpoint": hashes[args.checkpoint], "unet": hashes.get(args.unet),
        "loras": [[hashes[path], strength] for path, strength in loras],
        "text_encoder": hashes.get(args.text_encoder), "allow_partial": args.allow_partial,
        "templates": list(CAPTION_TEMPLATES[args.templates]),
        "steps": args.steps, "learning_rate": args.learning_rate, "batch_size": args.batch_size,
        "num_vectors": args.num_vectors, "init_word": args.init_word, "seed": args.seed,
        "resolution": args.resolution, "precision": precision,
    }
    if folder is not None:
        inputs["images"] = [[name, sha256_file(os.path.join(args.images, name))] for name in folder.names]
        inputs["captions"] = folder.captions
    else:
        inputs["generated"] = {"from": hashes[args.generate_from], "prompts": prompts, "count": args.generate_count,
                               "steps": args.generate_steps, "cfg": args.generate_cfg}
    return inputs


def run(args) -> int:
    if args.no_mixed_precision and args.precision not in ("auto", "fp32"):
        raise SystemExit(f"error: --no-mixed-precision (fp32) contradicts --precision {args.precision}")
    check_settings(args.steps, args.learning_rate)
    for option in ("checkpoint", "unet", "text_encoder", "generate_from"):
        if getattr(args, option):
            setattr(args, option, resolve_model_file(getattr(args, option), option))
    loras = [(resolve_model_file(path, "lora"), strength) for path, strength in parse_loras(args.lora)]
    destination = output_path(args)
    for path in [destination] + ([negation_set_path(destination)] if args.export_negation_set else []):
        if os.path.exists(path) and not (args.overwrite or args.resume):
            raise SystemExit(f"error: {path} exists; pass --overwrite (or --resume) or choose another --name")
    folder, prompts = read_data(args)
    if args.training_prompts:
        if folder is None:
            raise SystemExit("error: --training-prompts names the prompts of --images; generated images record "
                             "their --generate-prompts themselves")
        read_prompts(args.training_prompts)  # a missing or empty file fails now, before any model loads
    work_dir = args.work_dir or default_work_dir(
        os.path.join(folder_paths.get_output_directory(), "implicit_negative_training"), destination)
    with claimed(work_dir, destination):
        return train(args, loras, folder, prompts, destination, work_dir)


def train(args, loras, folder: ImageFolder | None, prompts: list[str], destination: str, work_dir: str) -> int:
    paths = [args.checkpoint, args.unet, args.text_encoder, args.generate_from] + [path for path, _ in loras]
    hashes = {path: sha256_path(path) for path in paths if path}  # once: for the fingerprint and the metadata
    # ComfyUI loads a checkpoint's MODEL onto get_torch_device(): the precision is known before it loads.
    precision = ci.training_precision("fp32" if args.no_mixed_precision else args.precision,
                                      comfy.model_management.get_torch_device())
    inputs = run_inputs(args, hashes, loras, folder, prompts, precision)
    state = open_run(work_dir, inputs, args.resume, args.restart)
    state_path = os.path.join(work_dir, "state.pt")

    if folder is not None:
        images, captions = folder.images, folder.captions
        data_source = f"folder {os.path.abspath(args.images)} ({len(folder.names)} images)"
    else:
        images, captions, data_source = generate_data(args, prompts, work_dir)
    try:
        model, clip, vae, reports = load_unlearned_model(args.checkpoint, args.unet, loras, args.text_encoder,
                                                         folder_paths.get_folder_paths("embeddings"),
                                                         args.allow_partial)
    except WeightLayoutError as error:
        raise SystemExit(f"error: {error}") from error
    for report in reports:
        print(f"[weights] {report.describe()}")
    latents = cached_latents(work_dir, vae, images, args.checkpoint)
    config = InversionConfig(steps=args.steps, learning_rate=args.learning_rate, seed=args.seed,
                             num_vectors=args.num_vectors, batch_size=args.batch_size)

    sources = run_sources(args, reports, data_source, hashes)
    sources.generation_prompts, sources.prompt_source, sources.image_sha256s = training_data_provenance(
        args, folder, prompts, images, inputs)
    run = run_metadata(model, clip, sources, config,
                       init_word=args.init_word, templates=args.templates, resolution=args.resolution,
                       num_images=len(captions), concept=args.concept, precision=precision)
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
    digest = save_embedding(destination, trained.file_vectors,
                            embedding_metadata(run, trained.losses, config.steps, trained.loss_scale, trained.warning))
    if args.export_negation_set:
        hashes = [tuple(entry) for entry in inputs["images"]] if folder is not None else pixel_hashes(images)
        exported = export_negation_set(negation_set_path(destination), vae, latents, hashes, args.resolution,
                                       f"python -m trainer: {data_source}")
        print(f"[done] negation set {negation_set_path(destination)} ({exported.latents.shape[0]} latents)")
    if trained.warning:
        print(f"[warning] {trained.warning}")
    print(f"[done] {destination} (sha256 {digest[:12]}); loss log and previews in {work_dir}")
    return 0


def training_data_provenance(args, folder: ImageFolder | None, prompts: list[str], images: torch.Tensor,
                             inputs: dict):
    """(generation prompts or None when unknown, where they are known from, sha256 per training image)."""
    if folder is None:  # generated here: the prompts are known, the images are pixels
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        return list(prompts), "generated", tuple(hashlib.sha256(p.tobytes()).hexdigest() for p in pixels)
    digests = tuple(digest for _, digest in inputs["images"])
    if args.training_prompts:
        return read_prompts(args.training_prompts), "prompts file", digests
    found = [p for per_image in folder.generation_prompts for p in per_image]
    return (found, "PNG metadata", digests) if found else (None, "", digests)


def run_sources(args, reports, data_source: str, hashes: dict) -> RunSources:
    """The model files (names and sha256) and the data of a CLI run."""
    base_hash = hashes[args.checkpoint]
    applied = ",".join(hashes.get(r.path) or sha256_path(r.path) for r in reports)  # a folder's report names its file
    return RunSources(base_model=os.path.basename(args.checkpoint), base_model_hash=base_hash,
                      unlearned_model="; ".join(r.describe() for r in reports) or os.path.basename(args.checkpoint),
                      unlearned_model_hash=applied or base_hash, data=data_source, trained_in="python -m trainer")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    try:
        code = run(args)
    except (TrainingDataError, ci.TrainingSetupError, RunLockedError, NegationSetError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"[time] {time.time() - started:.1f} s")
    return code
