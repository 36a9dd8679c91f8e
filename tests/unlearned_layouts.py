"""Unlearned-weight files in the layouts erasure methods publish, written by each method's own saving code path
on diffusers' UNet2DConditionModel shaped like the rig's tiny SD1.5 UNet (weights: the tiny checkpoint's), and
AdvUnlearn's text encoder as transformers' CLIPTextModel saves it (weights: the tiny checkpoint's CLIP-L).

The method code is not vendored: each writer repeats the few lines of the method's repository that choose the
tensors and save them (cited per function), with diffusers and peft doing the naming, as in the originals.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

DUO_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]  # naver-ai/DUO train/unlearn-sd.py


def diffusers_unet(model=None, cross_attention_dim: int = 768):
    """diffusers' UNet2DConditionModel with the tiny rig's shape (comfy_rig.TINY_UNET_CONFIG: one 320-channel
    level, one res + transformer block, no middle block), holding ``model``'s UNet weights when given."""
    from diffusers import UNet2DConditionModel
    import comfy.utils
    unet = UNet2DConditionModel(sample_size=32, block_out_channels=(320,), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                                mid_block_type=None, cross_attention_dim=cross_attention_dim, attention_head_dim=8)
    if model is not None:
        ldm = model.model.diffusion_model.state_dict()
        to_ldm = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
        unet.load_state_dict({key: ldm[to_ldm[key]].float() for key in unet.state_dict()})
    return unet.eval()


def perturbed(tensor: torch.Tensor, generator: torch.Generator, scale: float = 0.05) -> torch.Tensor:
    """What training changed: the weight plus noise of about its own size (the tiny weights are ~N(0, 0.02))."""
    return tensor + torch.randn(tensor.shape, generator=generator) * scale


def duo_lora(unet, folder: str, seed: int = 0, rank: int = 4, lora_alpha: int | None = None,
             with_metadata: bool = False) -> str:
    """DUO's LoRA (train/unlearn-sd.py): peft LoraConfig(r, lora_alpha=r, gaussian init, attention projections),
    saved by get_peft_model_state_dict -> convert_state_dict_to_diffusers -> save_lora_weights. lora_B starts at
    zero (a no-op), so it is drawn at random here as training would move it. Returns the .safetensors path."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=lora_alpha or rank, init_lora_weights="gaussian",
                                target_modules=DUO_TARGET_MODULES))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    metadata = {"unet_lora_adapter_metadata": unet.peft_config["default"].to_dict()} if with_metadata else {}
    StableDiffusionPipeline.save_lora_weights(save_directory=folder, unet_lora_layers=layers, **metadata)
    return os.path.join(folder, "pytorch_lora_weights.safetensors")


def spm_lora(unet, path: str, seed: int = 0, rank: int = 2, text_encoder_layers: int = 0) -> str:
    """SPM's adapter (Con6924/SPM src/models/spm.py, SPMNetwork): one LoRA on every Linear/Conv2d inside each
    Transformer2DModel, named ``lora_unet_<module path with _>`` with lora_down/lora_up/alpha (kohya's layout,
    which kohya sd-scripts also write; ``text_encoder_layers`` adds kohya ``lora_te_`` modules)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}

    def add(name, module):
        kernel = (1, 1) if isinstance(module, torch.nn.Conv2d) else ()
        state[f"{name}.lora_down.weight"] = torch.randn(rank, module.weight.shape[1], *kernel, generator=generator)
        state[f"{name}.lora_up.weight"] = torch.randn(module.weight.shape[0], rank, *kernel, generator=generator) * 0.05
        state[f"{name}.alpha"] = torch.tensor(1.0)

    for name, module in unet.named_modules():
        if module.__class__.__name__ == "Transformer2DModel":
            for child_name, child in module.named_modules():
                if child.__class__.__name__ in ("Linear", "Conv2d"):
                    add(f"lora_unet.{name}.{child_name}".replace(".", "_"), child)
    for layer in range(text_encoder_layers):
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
            add(f"lora_te_text_model_encoder_layers_{layer}_self_attn_{projection}", torch.nn.Linear(768, 768))
    save_file(state, path)
    return path


def esd_partial(unet, path: str, train_method: str = "esd-x", seed: int = 0) -> str:
    """New ESD (rohitgandikota/erasing esd_sd.py + utils/sd_utils.py get_esd_trainable_parameters): the trained
    parameters of the chosen Linear/Conv2d modules under diffusers names, bfloat16, one safetensors file."""
    chosen = {"esd-x": lambda n: "attn2" in n, "esd-u": lambda n: "attn2" not in n,
              "esd-x-strict": lambda n: "attn2.to_k" in n or "attn2.to_v" in n}[train_method]
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if module.__class__.__name__ in ("Linear", "Conv2d") and chosen(name):
            for parameter_name, parameter in module.named_parameters():
                state[f"{name}.{parameter_name}"] = perturbed(parameter.detach(), generator).to(torch.bfloat16)
    save_file(state, path)
    return path


def uce_partial(unet, path: str, seed: int = 0) -> str:
    """New UCE (rohitgandikota/unified-concept-editing trainscripts/uce_sd_erase.py): the edited attn2 to_k /
    to_v weights only, ``<module>.weight``, one safetensors file."""
    generator = torch.Generator().manual_seed(seed)
    state = {f"{name}.weight": perturbed(module.weight.detach(), generator) for name, module in unet.named_modules()
             if "attn2" in name and (name.endswith("to_v") or name.endswith("to_k"))}
    save_file(state, path)
    return path


def perturb_all(unet, seed: int = 0):
    """``unet`` after a (pretend) full fine-tune: every parameter moved."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.copy_(perturbed(parameter, generator, scale=0.01))
    return unet


def full_unet_pt(unet, path: str) -> str:
    """Old ESD's diffusers export (train-scripts/convertModels.py), old UCE (train-scripts/train_erase.py) and RECE
    (train.py): ``torch.save(unet.state_dict(), path)``, the whole UNet under diffusers names, a pickle."""
    torch.save(unet.state_dict(), path)
    return path


def mace_pipeline_unet(unet, folder: str) -> str:
    """MACE (Shilin-LU/MACE src/fuse_lora_close_form.py): ``pipeline.save_pretrained``; its UNet is
    ``unet/diffusion_pytorch_model.safetensors``, the whole UNet under diffusers names."""
    unet.save_pretrained(os.path.join(folder, "unet"))
    return os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")


def clip_l_state(clip) -> dict:
    """The tiny checkpoint's CLIP-L under ``text_model.*`` keys, as transformers 4.x saved CLIPTextModel."""
    prefix = "clip_l.transformer."
    return {k[len(prefix):]: v.contiguous() for k, v in clip.get_sd().items() if k.startswith(prefix + "text_model.")}


def advunlearn_text_encoders(clip, root) -> tuple[dict, torch.nn.Module]:
    """AdvUnlearn's text encoder (OPTML-Group/AdvUnlearn: a transformers CLIPTextModel folder): ``clip``'s CLIP-L
    loaded into the installed transformers' CLIPTextModel (the reference encoder, returned in float32) and saved
    by its ``save_pretrained`` in both layouts it writes, under ``root`` (a pathlib.Path):
    ({"text_model.": folder, "no prefix": folder}, reference)."""
    import shutil
    import comfy.sd1_clip
    import transformers
    legacy = root / "transformers4"
    legacy.mkdir()
    save_file(clip_l_state(clip), str(legacy / "model.safetensors"))
    shutil.copy(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json"), legacy / "config.json")
    loaded = transformers.CLIPTextModel.from_pretrained(str(legacy), dtype=torch.float16)
    loaded.save_pretrained(str(root / "prefixed"))  # transformers puts back the prefix it removed on loading
    with torch.device("meta"):
        built = transformers.CLIPTextModel(loaded.config)
    built.load_state_dict(loaded.state_dict(), assign=True)
    built.save_pretrained(str(root / "plain"))  # a model built in memory is saved under its own (unprefixed) names
    return {"text_model.": root / "prefixed", "no prefix": root / "plain"}, loaded.float().eval()


def truncated_text_encoder(folder, path: str) -> list[str]:
    """``folder``'s model.safetensors without the last layer's MLP (an interrupted download); the cut keys."""
    from safetensors.torch import load_file
    state = load_file(os.path.join(folder, "model.safetensors"))
    cut = sorted(k for k in state if k.removeprefix("text_model.").startswith("encoder.layers.11.mlp."))
    save_file({k: v for k, v in state.items() if k not in cut}, path)
    return cut


def assert_encodes_as(clip, reference, text: str = "a photo of a cat") -> None:
    """ComfyUI's CLIPTextEncode conditioning (and pooled output) from ``clip`` equals transformers' ``reference``."""
    import nodes
    (cond, extra), = nodes.CLIPTextEncode().encode(clip, text)[0]
    ids = torch.tensor([[token for token, _ in clip.tokenize(text)["l"][0]]])
    with torch.no_grad():
        expected = reference(input_ids=ids)
    assert (cond - expected.last_hidden_state).abs().max() < 1e-4
    assert (extra["pooled_output"] - expected.pooler_output).abs().max() < 1e-4
