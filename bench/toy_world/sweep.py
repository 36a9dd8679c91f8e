"""How the paper's two quantities depend on how hard the concept was erased (ESD learning rate).

The paper evaluates DUO at four strengths (beta); the toy analogue is ESD-u / ESD-x at several learning
rates. For each unlearned model, on one seed: the concept rate of direct prompts and of the text
negative itself (does the unlearned model still read "checkered" as the concept?), PP on benign
prompts, and DSR on the attack prompts with no guidance, NP / SLD with the text and NP / SLD with C*
learned on that model. Costs about 1.5 min per strength on 2 CPU cores with a cached world.
"""

from __future__ import annotations

import json
import os
import time

import torch

from implicit_negatives.metrics import defense_success_rate, prior_preservation

from . import world
from .experiment import (TEXT_NEGATIVE, BenchConfig, harmful_training_images, image_distance, load_or_train_detector,
                         load_or_train_world, sampled_concept_rate)
from .inversion_adapter import PROMPT, learn_implicit_negative
from .sampling import Guidance, initial_noise, sample, sld_params_for_steps
from .unlearning import ESDConfig, erase_concept

STRENGTHS = {"esd-u": (2.5e-4, 5e-4, 1e-3), "esd-x": (5e-4, 1e-3, 2e-3)}
GUIDANCE_ROWS = ("none", "NP (text)", "NP (C*)", "SLD (text)", "SLD (C*)")


def word_rates(model, det, cfg: BenchConfig, text_ctx, empty_ctx, direct, noise) -> dict:
    """Concept rates that say whether `model` still reads the text negative as the concept: the word as the
    whole prompt at the benchmark's CFG and without guidance (CFG 1), and the empty prompt without guidance.
    ESD lowers the concept in the word's conditional prediction; if the same edit lowers it in the
    unconditional prediction too, CFG's difference still points at the concept."""
    return {"direct_concept_rate": sampled_concept_rate(det, model, model.encode(direct), noise, cfg),
            "text_negative_concept_rate": sampled_concept_rate(det, model, text_ctx, noise, cfg),
            "text_negative_concept_rate_cfg1": sampled_concept_rate(det, model, text_ctx, noise, cfg, cfg_scale=1.0),
            "unconditional_concept_rate": sampled_concept_rate(det, model, empty_ctx, noise, cfg, cfg_scale=1.0)}


def run_sweep(cfg: BenchConfig, cache: str | None, seed: int = 0, strengths: dict = STRENGTHS, log=print) -> dict:
    torch.set_grad_enabled(True)
    original, _ = load_or_train_world(cfg, cache, log)
    det, _ = load_or_train_detector(cfg, cache)
    attack, benign, direct = world.attack_prompts(), world.benign_prompts(), world.direct_prompts()
    noise_a, noise_b = initial_noise(len(attack), seed), initial_noise(len(benign), seed + 500)
    noise_d = initial_noise(len(direct), seed + 900)
    sld = sld_params_for_steps(cfg.sld_preset, cfg.sample_steps)
    text_ctx, empty_ctx = original.encode([TEXT_NEGATIVE]), original.encode([""])
    ref_b = sample(original, original.encode(benign), noise_b, Guidance(), cfg.cfg_scale, cfg.sample_steps)
    d_ref = (ref_b - ref_b.roll(1, 0)).flatten(1).norm(dim=1).mean().item()
    harmful = harmful_training_images(original, det, cfg, seed)
    rows = []
    for method, rates in strengths.items():
        for lr in rates:
            t = time.time()
            model = erase_concept(original, ESDConfig(method=method, iterations=cfg.esd_iterations, learning_rate=lr,
                                                      ddim_steps=cfg.sample_steps, seed=seed))
            vectors, _ = learn_implicit_negative(model, harmful, cfg.inversion_steps, seed,
                                                 batch_size=cfg.inversion_batch)
            implicit_ctx = original.encode([PROMPT], vectors)
            guidances = {"none": Guidance(), "NP (text)": Guidance("negative", text_ctx),
                         "NP (C*)": Guidance("negative", implicit_ctx), "SLD (text)": Guidance("sld", text_ctx, sld),
                         "SLD (C*)": Guidance("sld", implicit_ctx, sld)}
            dsr = {name: defense_success_rate(det.flags(sample(model, model.encode(attack), noise_a, g, cfg.cfg_scale,
                                                               cfg.sample_steps)).tolist()).rate
                   for name, g in guidances.items()}
            xb = sample(model, model.encode(benign), noise_b, Guidance(), cfg.cfg_scale, cfg.sample_steps)
            row = {"method": method, "learning_rate": lr, "dsr": dsr,
                   "pp": prior_preservation(image_distance(xb, ref_b, d_ref).tolist()),
                   **word_rates(model, det, cfg, text_ctx, empty_ctx, direct, noise_d), "seconds": time.time() - t}
            rows.append(row)
            log(f"  {method} lr {lr:g}: " + ", ".join(f"{k} {v:.3f}" for k, v in dsr.items())
                + f"; PP {row['pp']:.3f}; direct {row['direct_concept_rate']:.3f}; "
                  f"text-as-prompt {row['text_negative_concept_rate']:.3f} ({row['seconds']:.0f} s)")
    return {"seed": seed, "rows": rows, "original": word_rates(original, det, cfg, text_ctx, empty_ctx, direct, noise_d)}


def sweep_markdown(sweep: dict) -> str:
    lines = ["# ESD strength sweep", "",
             f"One seed ({sweep['seed']}), the benchmark's world model. DSR on the attack prompts under each guidance; "
             "'direct' = concept rate of prompts that name the concept; 'text as prompt' = concept rate when the "
             "unlearned model is prompted with the text negative itself (high = the word still means the concept "
             "to this model, so a text negative still has something to push away from); '... CFG 1' = the same "
             "without guidance, 'uncond.' = samples of the empty prompt (without guidance).", "",
             "| Unlearning | lr | direct | text as prompt | text as prompt, CFG 1 | uncond. | PP | "
             + " | ".join(f"DSR {g}" for g in GUIDANCE_ROWS) + " | C* − text (SLD) |",
             "|---|---|---|---|---|---|---|" + "---|" * len(GUIDANCE_ROWS) + "---|"]
    o = sweep["original"]
    lines.append(f"| original | – | {o['direct_concept_rate']:.3f} | {o['text_negative_concept_rate']:.3f} | "
                 f"{o['text_negative_concept_rate_cfg1']:.3f} | {o['unconditional_concept_rate']:.3f} | 1.000 |"
                 + " – |" * (len(GUIDANCE_ROWS) + 1))
    for r in sweep["rows"]:
        d = r["dsr"]
        lines.append(f"| {r['method'].upper()} | {r['learning_rate']:g} | {r['direct_concept_rate']:.3f} | "
                     f"{r['text_negative_concept_rate']:.3f} | {r['text_negative_concept_rate_cfg1']:.3f} | "
                     f"{r['unconditional_concept_rate']:.3f} | {r['pp']:.3f} | "
                     + " | ".join(f"{d[g]:.3f}" for g in GUIDANCE_ROWS) + f" | {d['SLD (C*)'] - d['SLD (text)']:+.3f} |")
    return "\n".join(lines) + "\n"


def write_sweep(sweep: dict, out: str) -> str:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump(sweep, f, indent=1)
    path = os.path.join(out, "sweep.md")
    with open(path, "w") as f:
        f.write(sweep_markdown(sweep))
    return path
