"""Concept erasure at toy scale: the ESD recipe (Gandikota et al., ICCV 2023), optionally with a
preservation term (design 2's ESD-x+p), and UCE's closed-form edit (Gandikota et al., WACV 2024).

ESD.

Faithful to the original CompVis `train-esd.py`: each iteration draws a random stop step, partially
samples x_t from noise with the *model being edited* conditioned on the concept (CFG at the "start
guidance"), then regresses the edited model's eps(x_t, c, t) onto the frozen model's negatively guided
score eps*(x_t, t) - eta [eps*(x_t, c, t) - eps*(x_t, t)]. ESD-u trains every UNet parameter outside the
cross-attention (and, as the old code, not the time embedding or the output layers); ESD-x trains only
the cross-attention (`attn2`). The text encoder is frozen. Toy-scale departures (stated in the report):
batch 4 instead of 1 and a larger learning rate, since the toy model has ~1/1000 of SD's parameters.
With `preserve_weight` > 0 (ESD-x+p) each iteration adds preserve_weight * ||eps(x_t, p, t) - eps*(x_t, p, t)||^2
for a batch of preserve prompts p (the empty prompt and benign prompts), at the same x_t: the edit must move
the word's conditional prediction and leave the others, including the unconditional one CFG compares with.

UCE (`uce_erase`). For every cross-attention key / value projection W (`attn2.to_k`, `attn2.to_v`), with the
text encoder's token states c_i of the word's prompt and n_i of the neutral prompt (UCE's alignment: from the
last word token to the end of the sequence, against the neutral prompt's from its last token) and the states
c_j of the preserve prompts, the closed form of the UCE paper (Eq. 7, with the released code's identity term):

    W' = (lam W + e sum_i (W n_i) c_i^T + p sum_j (W c_j) c_j^T) (lam I + e sum_i c_i c_i^T + p sum_j c_j c_j^T)^-1

so W' c_i ~ W n_i (the word now reads as the neutral prompt) while W' c_j ~ W c_j (the rest is kept); every
direction of the text states outside those spans keeps W through the lam I term.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import ToyDiffusion
from .sampling import ddim_step, ddim_timesteps


@dataclass(frozen=True)
class ESDConfig:
    concept: str = "checkered"
    method: str = "esd-u"  # "esd-u" | "esd-x"
    iterations: int = 200
    learning_rate: float = 1e-4
    eta: float = 1.0  # negative guidance
    start_guidance: float = 3.0
    ddim_steps: int = 25
    batch_size: int = 4
    seed: int = 0
    preserve_weight: float = 0.0  # ESD-x+p: weight of the preservation term (0 = the original ESD)
    preserve_prompts: tuple[str, ...] = ()


def esd_parameters(model: ToyDiffusion, method: str) -> list[torch.nn.Parameter]:
    """The UNet parameters ESD trains for `method`."""
    named = list(model.unet.named_parameters())
    if method == "esd-x":
        return [p for n, p in named if ".attn2." in n]
    if method == "esd-u":
        skip = (".attn2.", "time_mlp.", "conv_out.", "norm_out.")
        return [p for n, p in named if not any(s in n for s in skip)]
    raise ValueError(f"unknown ESD method {method!r}; use 'esd-u' or 'esd-x'")


def erase_concept(original: ToyDiffusion, cfg: ESDConfig = ESDConfig()) -> ToyDiffusion:
    """A copy of `original` with `cfg.concept` erased; `original` is left untouched."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    frozen = original
    model = copy.deepcopy(original).requires_grad_(False)
    params = esd_parameters(model, cfg.method)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.learning_rate)
    with torch.no_grad():
        c = frozen.encode([cfg.concept]).expand(cfg.batch_size, -1, -1)
        u = frozen.encode([""]).expand(cfg.batch_size, -1, -1)
        keep = frozen.encode(list(cfg.preserve_prompts)) if cfg.preserve_weight > 0 else None
    ts = ddim_timesteps(cfg.ddim_steps)
    ab = frozen.alphas_cumprod
    for _ in range(cfg.iterations):
        stop = int(torch.randint(0, cfg.ddim_steps, (1,), generator=gen))
        x = torch.randn(cfg.batch_size, 3, 16, 16, generator=gen)
        with torch.no_grad():
            for i in range(stop):  # partial sampling with the model being edited, concept-conditioned
                tt = torch.full((2 * cfg.batch_size,), int(ts[i]), dtype=torch.long)
                e_u, e_c = model.unet(x.repeat(2, 1, 1, 1), tt, torch.cat([u, c])).chunk(2)
                x = ddim_step(x, e_u + cfg.start_guidance * (e_c - e_u), int(ts[i]), int(ts[i + 1]), ab)
            t = torch.full((cfg.batch_size,), int(ts[stop]), dtype=torch.long)
            e0, ep = frozen.unet(x.repeat(2, 1, 1, 1), t.repeat(2), torch.cat([u, c])).chunk(2)
            target = e0 - cfg.eta * (ep - e0)
        loss = F.mse_loss(model.unet(x, t, c), target)
        if keep is not None:
            p = keep[torch.randint(0, keep.shape[0], (cfg.batch_size,), generator=gen)]
            with torch.no_grad():
                kept = frozen.unet(x, t, p)
            loss = loss + cfg.preserve_weight * F.mse_loss(model.unet(x, t, p), kept)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.requires_grad_(False).eval()


@dataclass(frozen=True)
class UCEConfig:
    concept: str = "checkered"
    neutral: str = ""  # UCE's default guide concept for erasure: the empty prompt
    preserve_prompts: tuple[str, ...] = ()
    erase_scale: float = 1.0
    preserve_scale: float = 1.0
    lamb: float = 0.1  # the released code's regulariser: lam * ||W' - W||^2


def states_from_last_word(model: ToyDiffusion, prompt: str) -> torch.Tensor:
    """Token states (n, D) of `prompt` from its last word token (BOS for the empty prompt) to the end."""
    last = len(prompt.split())
    return model.encode([prompt])[0, last:]


@torch.no_grad()
def uce_erase(original: ToyDiffusion, cfg: UCEConfig = UCEConfig()) -> ToyDiffusion:
    """A copy of `original` with `cfg.concept` mapped onto `cfg.neutral` in every cross-attention K/V
    projection (the closed form in the module docstring); `original` is left untouched."""
    model = copy.deepcopy(original).requires_grad_(False)
    word = states_from_last_word(original, cfg.concept)
    neutral = states_from_last_word(original, cfg.neutral)
    n = min(word.shape[0], neutral.shape[0])
    word, neutral = word[:n], neutral[:n]
    keep = (original.encode(list(cfg.preserve_prompts)).flatten(0, 1) if cfg.preserve_prompts
            else word.new_zeros(0, word.shape[1]))
    eye = torch.eye(word.shape[1], dtype=torch.float64)
    c, nn_, k = word.double(), neutral.double(), keep.double()
    gram = cfg.lamb * eye + cfg.erase_scale * c.T @ c + cfg.preserve_scale * k.T @ k
    for name, module in model.unet.named_modules():
        if name.endswith("attn2.to_k") or name.endswith("attn2.to_v"):
            w = module.weight.double()
            rhs = cfg.lamb * w + cfg.erase_scale * (w @ nn_.T) @ c + cfg.preserve_scale * (w @ k.T) @ k
            module.weight.copy_((rhs @ torch.linalg.inv(gram)).to(module.weight.dtype))
    return model.eval()
