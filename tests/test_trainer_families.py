"""The trainer on the tiny SD2.x (v-prediction) and SDXL checkpoints: diffusers' v-prediction loss, planted concepts
recovered (SDXL: both encoders' vectors at once, through the pooled output and size conditioning), and the node's SDXL
file read by stock ``embedding:NAME``. Text encoders are cut to three layers (``rig.load_tiny_family``)."""

import importlib

import pytest
import torch

from implicit_negatives.embedding_io import load_embedding
from implicit_negatives.inversion import InversionConfig, invert_concept, step_generator

from implicit_negatives.comfyui import rig
from test_trainer_planted import planted_batches

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapter(pack_module):
    return importlib.import_module("implicit_negatives.comfyui.inversion")


@pytest.fixture(scope="module")
def tiny_sd2(comfy, embeddings_dir):
    import folder_paths
    return rig.load_tiny_family("sd2", embedding_directory=folder_paths.get_folder_paths("embeddings"))


def test_sd2_loss_is_diffusers_v_prediction_loss(adapter, tiny_sd2):
    """diffusers' textual-inversion loss for a v-prediction model: MSE between the UNet output at the noised latent
    (its DDPMScheduler.add_noise) and DDPMScheduler.get_velocity, with SD2's training schedule."""
    from diffusers import DDPMScheduler
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="v_prediction")
    model, clip, _ = tiny_sd2
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([150, 800])
    with adapter.training_modules(model, clip) as modules, torch.no_grad():
        prompts = [adapter.tokenize_caption(modules.tokenizer, "a photo of a {}", 2)]
        vectors = adapter.init_vectors_from_word(modules, "dog", 2)
        sigma = modules.model_sampling.sigma(t.float()).float()
        ours = adapter.denoising_loss_on_batch(modules, prompts, vectors,
                                               adapter.TrainingBatch(x0=x0, noise=noise, sigma=sigma, prompts=[0, 0]))
        context = adapter.encode_vectors(modules, prompts * 2, vectors)
        v_pred = modules.base_model.diffusion_model(scheduler.add_noise(x0, noise, t), timesteps=t.float(),
                                                    context=context)
        reference = torch.nn.functional.mse_loss(v_pred.float(), scheduler.get_velocity(x0, noise, t))
        x_t = x0 + sigma.view(-1, 1, 1, 1) * noise
        eps_loss = torch.nn.functional.mse_loss(
            (x_t - modules.base_model.apply_model(x_t, sigma, c_crossattn=context)) / sigma.view(-1, 1, 1, 1), noise)
    assert abs(float(ours) - float(reference)) <= 1e-4 * float(reference)
    assert abs(float(eps_loss) - float(reference)) > 0.1 * float(reference)  # the eps loss is another objective


def invert_planted(adapter, modules, prompts, init, target, train, held_out):
    """40 inversion steps from ``init`` on the planted batches; (result, held-out losses of v*, init, learned)."""
    config = InversionConfig(steps=40, seed=0)
    sample = lambda step: train[int(torch.randint(0, len(train), (1,), generator=step_generator(0, step)))]
    result = invert_concept(adapter.make_loss_fn(modules, prompts, sample), init, config)
    return result, tuple(adapter.evaluate_loss(modules, prompts, vectors, held_out)
                         for vectors in (target, init, result.vectors))


def test_sd2_planted_concept_is_recovered(adapter, tiny_sd2):
    """As the SD1 planted test (test_trainer_planted.py), on OpenCLIP-H vectors (1024 wide) and a v-prediction UNet."""
    model, clip, _ = tiny_sd2
    with adapter.training_modules(model, clip) as modules:
        assert modules.embedding_key == "clip_h" and modules.width == 1024
        prompts = [adapter.tokenize_caption(modules.tokenizer, "a photo of a {}", 1)]
        table = modules.encoder.transformer.get_input_embeddings().weight.float()
        target = torch.randn(1, 1024, generator=torch.Generator().manual_seed(11)) * table.std()
        init = adapter.init_vectors_from_word(modules, "dog", 1)
        train = planted_batches(adapter, modules, prompts, target, 6, seed=1)
        held_out = planted_batches(adapter, modules, prompts, target, 6, seed=2)
        result, (loss_target, loss_init, loss_learned) = invert_planted(adapter, modules, prompts, init, target,
                                                                       train, held_out)
    print(f"\nSD2 held-out loss: v* {loss_target:.3e}  init 'dog' {loss_init:.3e}  learned {loss_learned:.3e}")
    assert loss_target < 1e-8
    assert loss_learned < 0.2 * loss_init


@pytest.fixture(scope="module")
def tiny_sdxl(comfy, embeddings_dir):
    import folder_paths
    return rig.load_tiny_family("sdxl", embedding_directory=folder_paths.get_folder_paths("embeddings"))


def sdxl_planted_batches(adapter, modules, prompts, target, count, seed):
    """test_trainer_planted's construction with SDXL's conditioning (``model_conds``: context, pooled output and size
    conditioning): v* denoises every triple perfectly."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    with torch.no_grad():
        for _ in range(count):
            x_t = torch.randn(1, 4, 8, 8, generator=g)
            sigma = modules.model_sampling.sigma(torch.randint(50, 950, (1,), generator=g).float()).float()
            denoised = modules.base_model.apply_model(x_t, sigma, **adapter.model_conds(modules, prompts, target, x_t))
            eps = (x_t - denoised) / sigma.view(-1, 1, 1, 1)
            batches.append(adapter.TrainingBatch(x0=denoised, noise=eps, sigma=sigma, prompts=[0]))
    return batches


def test_sdxl_planted_concept_is_recovered_through_both_encoders(adapter, tiny_sdxl):
    model, clip, _ = tiny_sdxl
    with adapter.training_modules(model, clip) as modules:
        assert modules.embedding_key == "clip_l+clip_g" and modules.width == 768 + 1280
        prompts = [adapter.tokenize_caption(modules.tokenizer, "a photo of a {}", 1)]
        init = adapter.init_vectors_from_word(modules, "dog", 1)
        generator = torch.Generator().manual_seed(11)
        target = torch.cat([torch.randn(1, part.width, generator=generator)
                            * part.encoder.transformer.get_input_embeddings().weight.float().std()
                            for part in modules.parts], dim=-1)
        train = sdxl_planted_batches(adapter, modules, prompts, target, 6, seed=1)
        held_out = sdxl_planted_batches(adapter, modules, prompts, target, 6, seed=2)
        # The size conditioning and the pooled output both reach the UNet: dropping y changes the prediction.
        x, sigma = train[0].x0 + train[0].sigma * train[0].noise, train[0].sigma
        conds = adapter.model_conds(modules, prompts, target, x)
        assert conds["y"].shape == (1, 2816)
        with torch.no_grad():
            other = modules.base_model.apply_model(x, sigma, c_crossattn=conds["c_crossattn"], y=torch.zeros_like(conds["y"]))
        assert (other - train[0].x0).abs().max() > 1e-4 * train[0].x0.abs().max()
        result, (loss_target, loss_init, loss_learned) = invert_planted(adapter, modules, prompts, init, target,
                                                                       train, held_out)
        moved = {key: float((result.vectors - init).split([768, 1280], dim=-1)[i].abs().max())
                 for i, key in enumerate(("clip_l", "clip_g"))}
    print(f"\nSDXL held-out loss: v* {loss_target:.3e}  init 'dog' {loss_init:.3e}  learned {loss_learned:.3e}; "
          f"largest change {moved}")
    assert loss_target < 1e-8
    assert loss_learned < 0.2 * loss_init
    assert min(moved.values()) > 1e-3  # both encoders' vectors were learned


def test_sdxl_node_saves_clip_l_and_clip_g_read_by_stock_embedding_syntax(comfy, pack, tiny_sdxl, embeddings_dir):
    """The node's file is the kohya / A1111 SDXL layout (clip_l (N, 768) + clip_g (N, 1280), plus our metadata), and
    ComfyUI's own ``embedding:NAME`` reads both halves: it equals the node's IMPLICIT_NEGATIVE through our encoder."""
    from test_embedding_nodes_engine import clip_text_encode, max_diff
    model, clip, vae = tiny_sdxl
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    negative = pack["TrainImplicitNegative"].execute(
        model, clip, vae, images=images, name="sdxl_trained", steps=2, learning_rate=0.005, num_vectors=2,
        init_word="cat", seed=7, resolution=64, templates="object", batch_size=1, concept="test", overwrite=True,
        gradient_checkpointing=False).result[0]
    saved = load_embedding(str(embeddings_dir / "sdxl_trained.safetensors"))
    assert {k: tuple(v.shape) for k, v in saved.vectors.items()} == {"clip_l": (2, 768), "clip_g": (2, 1280)}
    assert saved.metadata["steps"] == "2" and '"text_encoder": "clip_l+clip_g"' in saved.metadata["training"]
    stock = clip_text_encode(comfy, clip, "a photo, embedding:sdxl_trained")
    ours = pack["ImplicitNegativeConditioning"].execute(clip, negative, "a photo,", "in_text_chunk").result[0]
    assert max_diff(ours, stock) <= 1e-6
    plain = clip_text_encode(comfy, clip, "a photo,")
    assert (stock[0][0][..., :768] - plain[0][0][..., :768]).abs().max() > 1e-3      # CLIP-L half read
    assert (stock[0][0][..., 768:] - plain[0][0][..., 768:]).abs().max() > 1e-3      # CLIP-G half read


def test_sdxl_cli_preview_feeds_both_halves_of_the_vectors(pack_module, tiny_sdxl, tmp_path):
    """The CLI's preview (the embedding as the positive prompt) splits the (N, 768 + 1280) vectors per encoder."""
    cli = importlib.import_module("trainer.cli")
    model, clip, vae = tiny_sdxl
    vectors = torch.randn(2, 768 + 1280, generator=torch.Generator().manual_seed(3)) * 0.02
    cli.preview(model, clip, vae, vectors, "a photo of a {}", 1, 0, 64, str(tmp_path / "preview.png"))
    from PIL import Image
    assert Image.open(tmp_path / "preview.png").size == (64, 64)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_the_cli_trains_on_the_family_and_stock_embedding_syntax_reads_its_file(
        comfy, pack, family, tiny_sd2, tiny_sdxl, embeddings_dir, tmp_path, monkeypatch):
    """``python -m trainer`` end to end on the family's checkpoint (its main(), every check, the real loaders; the
    text encoders cut to three layers as everywhere in this module, by the te_model_options ComfyUI's loader takes):
    the file is the family's layout (SDXL: kohya / A1111, clip_l + clip_g and nothing else) with the pack's
    metadata, and stock ``embedding:NAME`` on that family reads it exactly as ImplicitNegativeConditioning does."""
    from PIL import Image
    from safetensors import safe_open
    from implicit_negatives.embedding_io import sha256_file
    from test_embedding_nodes_engine import clip_text_encode
    cli = importlib.import_module("trainer.cli")
    comfy_sd = importlib.import_module("comfy.sd")
    load = comfy_sd.load_checkpoint_guess_config
    monkeypatch.setattr(comfy_sd, "load_checkpoint_guess_config", lambda *args, **kwargs: load(
        *args, **{"te_model_options": rig.cut_text_encoders(3), **kwargs}))
    images = tmp_path / "images"
    images.mkdir()
    generator = torch.Generator().manual_seed(5)
    for i in range(2):
        Image.fromarray((torch.rand(64, 64, 3, generator=generator) * 255).to(torch.uint8).numpy()).save(
            images / f"{i}.png")
    checkpoint, name = rig.tiny_family_checkpoint_path(family), f"cli_{family}"
    assert cli.main(["--checkpoint", checkpoint, "--images", str(images), "--resolution", "64", "--steps", "2",
                     "--num-vectors", "2", "--init-word", "cat", "--seed", "3", "--name", name, "--concept", "test",
                     "--work-dir", str(tmp_path / "work"), "--no-preview"]) == 0
    path = embeddings_dir / f"{name}.safetensors"
    widths = {"sd2": {"clip_h": 1024}, "sdxl": {"clip_l": 768, "clip_g": 1280}}[family]
    with safe_open(str(path), "pt") as handle:
        assert {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()} == {
            key: (2, width) for key, width in widths.items()}
    meta = load_embedding(str(path)).metadata
    assert meta["format"] == "implicit-negative/1" and meta["intended_use"] == "negative"
    assert meta["model_family"] == {"sd2": "SD2.x", "sdxl": "SDXL"}[family], meta["model_family"]
    assert meta["steps"] == "2" and meta["concept"] == "test" and meta["base_model_hash"] == sha256_file(checkpoint)
    assert f'"text_encoder": "{"+".join(widths)}"' in meta["training"]
    clip = (tiny_sd2 if family == "sd2" else tiny_sdxl)[1]
    stock = clip_text_encode(comfy, clip, f"a photo, embedding:{name}")
    negative = pack["LoadImplicitNegative"].execute(f"{name}.safetensors", 1.0).result[0]
    ours = pack["ImplicitNegativeConditioning"].execute(clip, negative, "a photo,", "in_text_chunk").result[0]
    assert torch.equal(ours[0][0], stock[0][0]) and torch.equal(ours[0][1]["pooled_output"], stock[0][1]["pooled_output"])
    plain = clip_text_encode(comfy, clip, "a photo,")[0][0]
    start = 0
    for key, width in widths.items():  # every encoder's half of the context reads its vectors
        assert (stock[0][0][..., start:start + width] - plain[..., start:start + width]).abs().max() > 1e-3, key
        start += width
