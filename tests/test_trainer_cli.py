"""``python -m trainer`` on the tiny SD1.5 checkpoint: weight layouts, end-to-end output, kill + resume."""

import importlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import unlearned_layouts as layouts
from implicit_negatives.embedding_io import load_embedding, sha256_file
from implicit_negatives.inversion import load_state

from implicit_negatives.comfyui import headless, rig


@pytest.fixture(scope="module")
def weights(pack_module):
    return importlib.import_module("implicit_negatives.comfyui.weights")


@pytest.fixture(scope="module")
def cli(pack_module):
    return importlib.import_module("trainer.cli")


def diffusers_unet_state(model, only=lambda key: True, scale=1.0):
    """The tiny model's UNet under diffusers key names (what ESD/UCE/RECE save), optionally filtered."""
    import comfy.utils
    ldm_state = model.model.diffusion_model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return {d: (ldm_state[k].float() * scale).contiguous() for d, k in mapping.items() if k in ldm_state and only(d)}


def test_partial_diffusers_unet_is_merged_as_patches_with_a_report(weights, tiny_sd15, tmp_path):
    model = tiny_sd15[0]
    partial = diffusers_unet_state(model, lambda d: "attn2.to_k" in d or "attn2.to_v" in d, scale=0.0)
    partial["not.a.unet.key"] = torch.zeros(3)
    path = str(tmp_path / "esd-x-strict.safetensors")
    save_file(partial, path)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    with pytest.raises(weights.WeightLayoutError, match=rf"1 of its {len(partial)} tensors do not fit .*not\.a\.unet"):
        weights.apply_unet_weights(model, path)
    patched, report = weights.apply_unet_weights(model, path, allow_partial=True)
    assert report.layout == f"partial ({len(partial) - 1} of 122 weights) UNet, diffusers keys"
    assert (report.matched, report.total) == (len(partial) - 1, len(partial)) and report.matched >= 4
    assert report.unmatched == ["not.a.unet.key"]
    assert f"{report.matched}/{report.total} tensors used" in report.describe()
    import comfy.utils
    ldm = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    assert set(patched.patches) - set(model.patches) == {"diffusion_model." + ldm[d] for d in partial if d in ldm}
    key = next(k for k in patched.patches if "attn2.to_k" in k)
    assert patched.patches[key][-1][1][0] == "set"  # (strength, ("set", (weight,)), ...) in ComfyUI's patch list
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())  # the shared model is untouched


def test_full_diffusers_unet_and_mismatches(weights, tiny_sd15, tmp_path):
    model = tiny_sd15[0]
    full = diffusers_unet_state(model)
    patches, report = weights.unet_patches(model, full, "full.pt")
    assert report.layout == "full UNet, diffusers keys" and report.matched == len(model.model.diffusion_model.state_dict())
    with pytest.raises(weights.WeightLayoutError, match="none of its 2 tensors"):
        weights.unet_patches(model, {"foo.weight": torch.zeros(1), "bar": torch.zeros(1)}, "other.safetensors")
    key = next(k for k in full if "attn2.to_k" in k)
    with pytest.raises(weights.WeightLayoutError, match="different architecture"):
        weights.unet_patches(model, {key: torch.zeros(320, 1024)}, "sd2.safetensors")


def test_lora_is_applied_through_comfyui_with_a_report(weights, tiny_sd15, tmp_path):
    model, clip, _ = tiny_sd15
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    lora = {f"{name}.lora_down.weight": torch.randn(1, 320) * 0.01, f"{name}.lora_up.weight": torch.randn(320, 1) * 0.01,
            f"{name}.alpha": torch.tensor(1.0)}
    path = str(tmp_path / "spm.safetensors")
    save_file(lora, path)
    new_model, new_clip, report = weights.apply_lora(model, clip, path, 1.0)
    assert (report.matched, report.total) == (3, 3) and new_model is not model  # tensors, not patched modules
    save_file({"lora_te_nothing.lora_down.weight": torch.zeros(1, 2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(weights.WeightLayoutError, match="none of its 1 tensors"):
        weights.apply_lora(model, clip, str(tmp_path / "bad.safetensors"), 1.0)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory, tiny_checkpoint, tiny_sd15):
    """Two 64x80 concept images (one captioned) and a partial ESD-style UNet patch."""
    folder = tmp_path_factory.mktemp("cli")
    images = folder / "images"
    images.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(2):
        pixels = (torch.rand(80, 64, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"{i}.png")
    (images / "1.txt").write_text("a red {} on a table")
    unet = folder / "esd-x.safetensors"
    save_file(diffusers_unet_state(tiny_sd15[0], lambda d: "attn2.to_v" in d, scale=0.5), str(unet))
    base = ["--checkpoint", os.path.join(*tiny_checkpoint), "--unet", str(unet), "--images", str(images),
            "--resolution", "64", "--steps", "3", "--checkpoint-every", "1", "--init-word", "cat", "--seed", "4",
            "--concept", "test concept"]
    return folder, base


@pytest.fixture(scope="module")
def uninterrupted(cli, run_inputs, embeddings_dir):
    folder, base = run_inputs
    import io
    from contextlib import redirect_stdout
    log = io.StringIO()
    with redirect_stdout(log):
        code = cli.main(base + ["--name", "cli_test", "--work-dir", str(folder / "work_a"), "--preview-steps", "2"])
    assert code == 0
    return embeddings_dir / "cli_test.safetensors", folder / "work_a", log.getvalue()


def test_cli_writes_an_embedding_comfyui_loads(comfy, pack_module, uninterrupted, tiny_sd15, embeddings_dir):
    path, work, log = uninterrupted
    import re
    assert re.search(r"esd-x\.safetensors: partial \((\d+) of 122 weights\) UNet, diffusers keys, \1/\1 tensors used",
                     log), log
    embedding = load_embedding(str(path))
    assert embedding.vectors["clip_l"].shape == (1, 768)
    meta = embedding.metadata
    assert meta["steps"] == "3" and meta["init_word"] == "cat" and meta["concept"] == "test concept"
    assert meta["intended_use"] == "negative" and len(meta["base_model_hash"]) == 64
    assert "partial (" in meta["unlearned_model"]
    from implicit_negatives import leakage  # a folder without PNG prompt metadata: prompts unknown, images hashed
    assert json.loads(meta["training_prompts"])["source"] == "unknown"
    images = sorted(p for p in (work.parent / "images").iterdir() if p.suffix == ".png")
    assert meta["training_images_sha256"] == leakage.image_set_digest(sha256_file(str(p)) for p in images)
    adapter = importlib.import_module("implicit_negatives.comfyui.clip")
    assert meta["text_encoder_fingerprint"] == adapter.clip_fingerprint(tiny_sd15[1])  # same CLIP: no warning
    identity = importlib.import_module("implicit_negatives.comfyui.model_identity")
    assert len(meta["model_fingerprint"]) == 16  # of the ESD-patched model, so it differs from the plain one
    assert meta["model_fingerprint"] != identity.model_fingerprint(tiny_sd15[0])
    from comfy.sd1_clip import load_embed
    assert torch.equal(load_embed("cli_test", [str(embeddings_dir)], 768, "clip_l"),
                       embedding.vectors["clip_l"])
    encode = comfy.NODE_CLASS_MAPPINGS["CLIPTextEncode"]().encode
    with_embedding = encode(tiny_sd15[1], "embedding:cli_test")[0][0][0]
    assert (with_embedding - encode(tiny_sd15[1], "")[0][0][0]).abs().max() > 1e-3
    rows = (work / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,ema" and len(rows) == 4
    assert Image.open(work / "loss.png").size == (800, 400)
    assert Image.open(work / "preview-final.png").size == (64, 64)
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".tmp-")]


# --------------------------------------------------------------------------- nothing silent, nothing lost

# The issue asks for 10 random kill points; CI runs fewer (each costs a trainer start-up): set
# IMPLICIT_NEGATIVES_KILL_POINTS=10 for the full test, IMPLICIT_NEGATIVES_KILL_SEED to draw other points.
KILL_POINTS = int(os.environ.get("IMPLICIT_NEGATIVES_KILL_POINTS", "3"))
KILL_SEED = int(os.environ.get("IMPLICIT_NEGATIVES_KILL_SEED", "0"))


def with_option(args, option, value=None):
    """``args`` with ``option`` set to ``value`` (added when absent), or removed with its value when None."""
    args = list(args)
    if option in args:
        at = args.index(option)
        del args[at:at + 2]
    return args + ([option, value] if value is not None else [])


def state_step(path) -> int:
    return load_state(str(path))["step"] if os.path.exists(path) else 0


def assert_complete_files(work, target):
    """Every file under its final name is whole: it loads (a killed atomic write leaves only a *.partial)."""
    from safetensors.torch import load_file
    if (work / "state.pt").exists():
        load_state(str(work / "state.pt"))
    for name in os.listdir(work):
        if name == "checkpoint.safetensors":
            load_embedding(str(work / name))
        elif name.startswith("latents-") and name.endswith(".safetensors"):
            load_file(str(work / name))
        elif name == "run.json":
            json.loads((work / name).read_text())
        elif name == "loss.csv":
            rows = (work / name).read_text().splitlines()
            assert rows[0] == "step,loss,ema" and all(len(r.split(",")) == 3 for r in rows)
    if target.exists():
        load_embedding(str(target))


def partial_files(*folders):
    return [os.path.join(f, n) for folder in folders for f, _, names in os.walk(folder) for n in names
            if n.endswith(".partial") or n.endswith(".lock")]


def test_sigkill_at_random_points_then_resume_equals_the_uninterrupted_run(cli, run_inputs, uninterrupted, tmp_path,
                                                                          capsys):
    """SIGKILL ``python -m trainer`` at random points of its run, resuming each time; the last resume finishes
    with the uninterrupted run's vectors and losses (bit for bit), and no partial file is left anywhere.

    A kill point is (step k, fraction f): once this process has passed its checks (written run.json) and the
    saved state has reached step k, wait f seconds (about one tiny step) and kill: inside a step, a
    checkpoint write, the model load or the latent encoding.
    """
    folder, base = run_inputs
    target, work = tmp_path / "out" / "resumed.safetensors", tmp_path / "work"
    args = base + ["--output", str(target), "--work-dir", str(work), "--no-preview"]
    env = dict(os.environ, COMFYUI_PATH=headless.locate_comfyui(development_copy=True)[0])
    rng = random.Random(KILL_SEED)
    points = sorted((rng.randrange(3), rng.random()) for _ in range(KILL_POINTS))
    saved_steps, left_behind = [], []
    for k, fraction in points:
        record = work / "run.json"
        recorded_at = record.stat().st_mtime_ns if record.exists() else None
        resume = ["--resume"] if record.exists() else []
        process = subprocess.Popen([sys.executable, "-m", "trainer", *args, *resume], cwd=headless.PACK_ROOT, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 300
        while process.poll() is None and time.time() < deadline and not (
                record.exists() and record.stat().st_mtime_ns != recorded_at and state_step(work / "state.pt") >= k):
            time.sleep(0.02)
        time.sleep(fraction)
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate()
        assert process.returncode in (0, -signal.SIGKILL), stderr.decode()[-2000:]
        assert_complete_files(work, target)
        saved_steps.append(state_step(work / "state.pt"))
        left_behind.append(sum(p.endswith(".partial") for p in partial_files(work, target.parent)))
        if process.returncode == 0:  # finished before its kill point
            break
    assert saved_steps == sorted(saved_steps)  # a resume never loses saved progress
    print(f"\nkill points {[(k, round(f, 2)) for k, f in points]}: saved step after each kill {saved_steps}, "
          f"half-written files left {left_behind}")

    assert cli.main(args + ["--resume"]) == 0
    resumed = load_embedding(str(target)).vectors["clip_l"]
    assert torch.equal(resumed, load_embedding(str(uninterrupted[0])).vectors["clip_l"])
    assert load_state(str(work / "state.pt"))["losses"].tolist() == \
        load_state(str(uninterrupted[1] / "state.pt"))["losses"].tolist()
    assert partial_files(work, target.parent) == []


def test_rerun_without_resume_refuses_to_overwrite_progress_and_restart_starts_over(cli, run_inputs, uninterrupted,
                                                                                    tmp_path):
    folder, base = run_inputs
    work = tmp_path / "work"
    shutil.copytree(uninterrupted[1], work)
    target = tmp_path / "again.safetensors"
    args = base + ["--output", str(target), "--work-dir", str(work), "--no-preview"]
    saved = (work / "state.pt").read_bytes()
    with pytest.raises(SystemExit, match="holds a run at step 3 of 3: rerun with --resume .* --restart"):
        cli.main(args)
    assert (work / "state.pt").read_bytes() == saved and not target.exists()
    with pytest.raises(SystemExit, match="--resume continues .* --restart discards"):
        cli.main(args + ["--resume", "--restart"])
    assert cli.main(args + ["--restart"]) == 0  # a fresh run: the same result as the first one
    assert not (work / "preview-final.png").exists()  # the old run's files are gone
    assert torch.equal(load_embedding(str(target)).vectors["clip_l"],
                       load_embedding(str(uninterrupted[0])).vectors["clip_l"])


def test_resume_refuses_a_run_with_other_models_data_or_settings(cli, run_inputs, uninterrupted, tmp_path):
    folder, base = run_inputs
    work = tmp_path / "work"
    shutil.copytree(uninterrupted[1], work)
    args = base + ["--output", str(tmp_path / "x.safetensors"), "--work-dir", str(work), "--resume"]
    images = tmp_path / "images"
    shutil.copytree(folder / "images", images)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(images / "0.png")
    (images / "1.txt").write_text("a blue {} on a table")
    for changed, expected in ((with_option(args, "--init-word", "dog"), "init_word"),
                              (with_option(args, "--steps", "5"), "steps"),
                              (with_option(args, "--templates", "style"), "templates"),
                              (with_option(args, "--unet"), "unet"),
                              (with_option(args, "--images", str(images)), "captions, images")):
        with pytest.raises(SystemExit, match=f"holds a run with other {expected}\\. Resume it with its own command"):
            cli.main(changed)
    assert state_step(work / "state.pt") == 3


def test_two_runs_never_share_a_work_folder_or_an_output(cli, run_inputs, tmp_path, capsys):
    import folder_paths
    from trainer.workdir import default_work_dir
    folder, base = run_inputs
    target, work = tmp_path / "shared.safetensors", tmp_path / "work"
    args = base + ["--output", str(target), "--work-dir", str(work), "--resume"]
    holder_code = ("import sys; from implicit_negatives.run_lock import run_lock\n"
                   "with run_lock(sys.argv[1], 'another run'):\n    print('held', flush=True); sys.stdin.read()\n")
    for lock, refused in ((work / "run.lock", f"work folder {work} is in use by a running trainer"),
                          (tmp_path / ".shared.safetensors.lock", f"output {target} is in use by a running trainer")):
        holder = subprocess.Popen([sys.executable, "-c", holder_code, str(lock)], cwd=headless.PACK_ROOT,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "held"
        other_work = with_option(args, "--work-dir", str(tmp_path / "other-work"))
        with pytest.raises(SystemExit, match=f"{refused} \\(pid {holder.pid} "):
            cli.main(args if lock.name == "run.lock" else other_work)
        holder.send_signal(signal.SIGKILL)  # dies holding it: the next run takes the lock over and says so
        holder.wait()
        capsys.readouterr()
        with pytest.raises(SystemExit, match="holds no run record"):  # stops right after taking the locks
            cli.main(args)
        assert f"took over the lock of a run that is no longer running (pid {holder.pid} " in capsys.readouterr().out
    assert partial_files(work, tmp_path / "other-work") == [] and not (tmp_path / ".shared.safetensors.lock").exists()

    root = os.path.join(folder_paths.get_output_directory(), "implicit_negative_training")
    a = default_work_dir(root, str(tmp_path / "a" / "x.safetensors"))
    b = default_work_dir(root, str(tmp_path / "x.safetensors"))
    assert a != b and os.path.basename(a).startswith("x-") and os.path.dirname(a) == root


def test_settings_that_cannot_train_are_refused_before_anything_loads(cli, run_inputs, tmp_path):
    folder, base = run_inputs
    args = base + ["--output", str(tmp_path / "x.safetensors"), "--work-dir", str(tmp_path / "work")]
    for option, value, message in (("--steps", "0", "steps must be at least 1"),
                                   ("--learning-rate", "nan", "learning rate nan is outside"),
                                   ("--learning-rate", "1e6", "learning rate 1000000.0 is outside"),
                                   ("--learning-rate", "-0.01", "is outside")):
        with pytest.raises(SystemExit, match=message):
            cli.main(with_option(args, option, value))
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "work").exists()


def test_images_are_checked_before_the_model_loads(cli, run_inputs, tmp_path):
    folder, base = run_inputs
    images = tmp_path / "images"
    shutil.copytree(folder / "images", images)
    (images / "2.png").write_bytes(b"\x89PNG broken")
    (images / "._0.png").write_bytes(b"AppleDouble")  # ignored: macOS metadata, not an image
    not_a_checkpoint = tmp_path / "not-a-checkpoint.safetensors"
    not_a_checkpoint.write_bytes(b"")  # loading it would fail: the images must be refused first
    args = with_option(with_option(base, "--images", str(images)), "--checkpoint", str(not_a_checkpoint))
    with pytest.raises(SystemExit, match=r"1 of 3 files in .* cannot be used:\n  2\.png: cannot read it"):
        cli.main(args + ["--output", str(tmp_path / "x.safetensors")])


def test_training_prompts_file_is_checked_before_anything_loads(cli, run_inputs, tiny_checkpoint, tmp_path):
    folder, base = run_inputs
    with pytest.raises(SystemExit, match="prompt file not found"):
        cli.main(base + ["--training-prompts", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "x.safetensors")])
    checkpoint = os.path.join(*tiny_checkpoint)
    (tmp_path / "p.txt").write_text("a photo of a cat\n")
    with pytest.raises(SystemExit, match="generated images record their --generate-prompts"):
        cli.main(["--checkpoint", checkpoint, "--generate-from", checkpoint, "--generate-prompts", str(tmp_path / "p.txt"),
                  "--training-prompts", str(tmp_path / "p.txt"), "--output", str(tmp_path / "x.safetensors")])


def test_a_mistyped_prompt_file_is_an_error_not_a_prompt(cli, tiny_checkpoint, tmp_path):
    checkpoint = os.path.join(*tiny_checkpoint)
    with pytest.raises(SystemExit, match="prompt file not found: .*promts.txt"):
        cli.main(["--checkpoint", checkpoint, "--generate-from", checkpoint, "--generate-prompts",
                  str(tmp_path / "promts.txt"), "--output", str(tmp_path / "x.safetensors")])


def test_the_readme_quick_start_command_works_as_typed(cli, tiny_checkpoint, tiny_sd15, embeddings_dir, tmp_path,
                                                       monkeypatch):
    """The README's command-line step, with its checkpoints in ComfyUI's folders (the tiny checkpoint as both
    sd-v1-4.safetensors and sd-v1-4-duo-nudity.safetensors), shortened only by size options."""
    import shlex
    import folder_paths
    readme = open(os.path.join(headless.PACK_ROOT, "README.md"), encoding="utf-8").read()
    blocks = readme.split("## Quick start", 1)[1].split("## Nodes", 1)[0].split("```")[1::2]
    (block,) = [b for b in blocks if "python -m trainer" in b]
    argv = shlex.split(block[block.index("python -m trainer"):].replace("\\\n", " "))
    assert argv[:3] == ["python", "-m", "trainer"]
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    for name in ("sd-v1-4.safetensors", "sd-v1-4-duo-nudity.safetensors"):
        os.symlink(os.path.join(*tiny_checkpoint), models / "checkpoints" / name)
    folder_paths.add_model_folder_path("checkpoints", str(models / "checkpoints"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv[3:] + ["--generate-count", "1", "--generate-steps", "1", "--steps", "1", "--resolution",
                                "64", "--no-preview", "--overwrite"]) == 0
    meta = load_embedding(str(embeddings_dir / "implicit-negative-nudity.safetensors")).metadata  # where it says
    assert meta["concept"] == "nudity" and "sd-v1-4-duo-nudity.safetensors" in meta["unlearned_model"]


def test_cli_without_comfyui_says_how_to_point_at_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    result = subprocess.run([sys.executable, "-m", "trainer", "--help"], cwd=headless.PACK_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "COMFYUI_PATH" in result.stderr
    env["COMFYUI_PATH"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-m", "trainer", "--help"], cwd=headless.PACK_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "not a ComfyUI source tree" in result.stderr


def test_cli_generates_its_data_from_a_reference_model(cli, tiny_checkpoint, tmp_path):
    """--generate-from samples the concept images with ComfyUI's sampler, saves them, and trains on them."""
    checkpoint = os.path.join(*tiny_checkpoint)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\na photo of a dog\n")
    work = tmp_path / "work"
    assert cli.main(["--checkpoint", checkpoint, "--generate-from", checkpoint, "--generate-prompts", str(prompts),
                     "--generate-prompt", "a photo of a bird", "--generate-count", "1", "--generate-steps", "2",
                     "--resolution", "64", "--steps", "1", "--no-preview",
                     "--output", str(tmp_path / "gen.safetensors"), "--work-dir", str(work)]) == 0
    assert sorted(os.listdir(work / "generated")) == [f"generated_00{i}_000.png" for i in range(3)]
    meta = load_embedding(str(tmp_path / "gen.safetensors")).metadata
    assert "generated by" in meta["training"] and '"images": 3' in meta["training"]
    from implicit_negatives import leakage
    recorded = json.loads(meta["training_prompts"])  # leakage: the generation prompts, as hashes
    assert (recorded["source"], recorded["count"]) == ("generated", 3)
    assert leakage.overlapping_prompts(["A photo of a DOG", "a photo of a fish", "a photo of a bird"],
                                       leakage.recorded_prompt_digests(meta)) == [0, 2]
    saved = sorted((work / "generated").iterdir())  # the same pixels the trainer hashed, as it saved them
    assert meta["training_images_sha256"] == leakage.image_set_digest(
        hashlib.sha256(np.asarray(Image.open(p).convert("RGB")).tobytes()).hexdigest() for p in saved)
    with pytest.raises(SystemExit, match="exactly one of"):
        cli.main(["--checkpoint", checkpoint, "--output", str(tmp_path / "x.safetensors")])


@pytest.mark.parametrize("layout", ["text_model.", "no prefix"])
def test_replaced_text_encoder_in_either_transformers_layout_encodes_as_the_reference(
        weights, tiny_sd15, saved_text_encoders, layout):
    """AdvUnlearn ships a transformers CLIPTextModel folder: ComfyUI's conditioning from it equals transformers'."""
    folders, reference = saved_text_encoders
    clip = tiny_sd15[1]
    replaced, report = weights.replace_text_encoder(clip, str(folders[layout]))
    assert replaced is not clip and (report.matched, report.total) == (196, 196)
    assert "196/196 tensors used" in report.describe()
    layouts.assert_encodes_as(replaced, reference)


def test_incomplete_or_foreign_text_encoders_are_refused_naming_the_keys(weights, tiny_sd15, saved_text_encoders,
                                                                           tmp_path):
    clip = tiny_sd15[1]
    cut = layouts.truncated_text_encoder(saved_text_encoders[0]["no prefix"], str(tmp_path / "truncated.safetensors"))
    with pytest.raises(weights.WeightLayoutError, match=r"192 of the 196 weights of this checkpoint's text encoder") as refused:
        weights.replace_text_encoder(clip, str(tmp_path / "truncated.safetensors"))
    assert len(cut) == 4 and all(k in str(refused.value) for k in cut) and "unexpected: none" in str(refused.value)
    extra = {"text_model.vision_model.post_layernorm.weight": torch.ones(768)}
    with pytest.raises(weights.WeightLayoutError, match=r"196 of the 196 .* unexpected: text_model.vision_model"):
        weights.text_encoder_state(clip, {**layouts.clip_l_state(clip), **extra}, "with_vision.safetensors")
    with pytest.raises(weights.WeightLayoutError, match=r"another model family"):
        weights.text_encoder_state(clip, {"text_model.embeddings.position_embedding.weight": torch.zeros(77, 1024)})
    with pytest.raises(weights.WeightLayoutError, match="holds no model.safetensors"):
        weights.replace_text_encoder(clip, str(tmp_path))


def test_a_text_encoder_with_broken_output_is_refused_before_training(weights, tiny_sd15, saved_text_encoders,
                                                                      tmp_path):
    """Keys can all match and the encoder still be unusable: NaN weights in the file, or zeroed ones."""
    import implicit_negatives.comfyui.inversion as ci
    model, clip, _ = tiny_sd15
    state = load_file(str(saved_text_encoders[0]["no prefix"] / "model.safetensors"))
    state["final_layer_norm.weight"] = torch.full_like(state["final_layer_norm.weight"], float("nan"))
    save_file(state, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ci.TrainingSetupError, match="nan.safetensors: .* NaN/Inf values"):
        weights.replace_text_encoder(clip, str(tmp_path / "nan.safetensors"))
    zeroed, _ = weights.replace_text_encoder(clip, str(saved_text_encoders[0]["text_model."]))
    with torch.no_grad():
        zeroed.cond_stage_model.clip_l.transformer.text_model.final_layer_norm.weight.zero_()
    with pytest.raises(ci.TrainingSetupError, match="same vector at every token position"):
        with ci.training_modules(model, zeroed):
            pass
