"""Design 2 of the paper in miniature (bench/toy_world/PREREGISTRATION.md): the smoke run writes a
well-formed report, UCE's edit solves its closed form, the sampler's Safe Denoiser and per-prompt negatives
reduce to the plain sampler where they must, and the verdict reads planted paired results as pre-registered.
Tiny models, no ComfyUI; about 40 s of CPU in all."""

from __future__ import annotations

import json

import pytest
import torch

from bench import paper_in_miniature
from bench.toy_world.design2 import SMOKE2, VARIANTS, template_of
from bench.toy_world.model import ToyDiffusion
from bench.toy_world.report2 import verdict
from bench.toy_world.sampling import Guidance, initial_noise, sample
from bench.toy_world.unlearning import UCEConfig, states_from_last_word, uce_erase
from implicit_negatives.safe_denoiser import SafeDenoiserParams


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ToyDiffusion(SMOKE2.model).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("design2")
    assert paper_in_miniature.main(["--design", "2", "--smoke", "--out", str(out), "--cache", "none", "--threads", "1"]) == 0
    return out


def test_smoke_run_writes_the_preregistered_report(smoke):
    doc = json.loads((smoke / "results.json").read_text())
    report = (smoke / "report.md").read_text()
    assert "SMOKE RUN" in report and "PREREGISTRATION.md" in report
    for heading in ("## Preconditions", "## The claims", "## Erasure audit", "## Overlap", "## Design 1", "## Tuning log"):
        assert heading in report
    for v in VARIANTS:
        assert isinstance(doc["verdict"][v]["valid"], bool)
        for suffix in ("", " + NP (text)", " + NP (C*)", " + SLD (text)", " + SLD (C*)", " + NP (C* in template)",
                       " + SD", " + SD + SLD (C*)"):
            row = doc["runs"][0]["conditions"][v + suffix]
            assert len(row["safe_flags"]) == SMOKE2.attack_prompts and 0 <= row["pp"] <= 1
    assert doc["runs"][0]["conditions"]["original"]["pp"] == 1.0
    # A smoke-sized world never draws the concept: the preconditions fail and the report says so.
    assert not any(doc["verdict"][v]["valid"] for v in VARIANTS)
    assert doc["verdict"]["statement"].startswith("Inconclusive")
    assert (smoke / "bar_chart.png").stat().st_size > 0 and (smoke / "grid_overview.png").stat().st_size > 0


def test_uce_solves_its_closed_form_and_edits_only_cross_attention_kv(tiny):
    """Oracle: W' minimises lam||W' - W||^2 + e sum ||W' c_i - W n_i||^2 + p sum ||W' c_j - W c_j||^2, so the
    gradient of that objective at W' is zero; the original model is untouched, only attn2.to_k / to_v change."""
    cfg = UCEConfig(preserve_prompts=("red circle on white", "blue square on black"), erase_scale=1.0,
                    preserve_scale=2.0, lamb=0.1)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    edited = uce_erase(tiny, cfg)
    for k, v in tiny.state_dict().items():
        torch.testing.assert_close(v, before[k])
    changed = {k for k, v in edited.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)
    c = states_from_last_word(tiny, cfg.concept).double()
    n = states_from_last_word(tiny, cfg.neutral)[:c.shape[0]].double()
    keep = tiny.encode(list(cfg.preserve_prompts)).flatten(0, 1).double()
    for k in changed:
        w, w2 = before[k].double(), edited.state_dict()[k].double()
        grad = (cfg.lamb * (w2 - w) + cfg.erase_scale * (c @ w2.T - n @ w.T).T @ c
                + cfg.preserve_scale * (keep @ w2.T - keep @ w.T).T @ keep)
        assert grad.abs().max() < 1e-4 * w.abs().max(), k
        assert (c @ w2.T - n @ w.T).norm() < 0.5 * (c @ w.T - n @ w.T).norm()  # the word now reads as the neutral


def test_safe_denoiser_in_the_sampler_acts_only_in_its_window_and_not_at_strength_zero(tiny):
    m = tiny
    cond, noise = m.encode(["red circle on white", "blue square on black"]), initial_noise(2, 0)
    negation = torch.rand(5, 3, 16, 16) * 2 - 1
    plain = sample(m, cond, noise, Guidance(), steps=4)
    on = SafeDenoiserParams(strength=0.33, bandwidth=3.15)
    zero = SafeDenoiserParams(strength=0.0, bandwidth=3.15)
    torch.testing.assert_close(sample(m, cond, noise, Guidance(negation=negation, safe=zero, safe_min_t=0), steps=4), plain)
    torch.testing.assert_close(sample(m, cond, noise, Guidance(negation=negation, safe=on, safe_min_t=1000), steps=4), plain)
    assert not torch.allclose(sample(m, cond, noise, Guidance(negation=negation, safe=on, safe_min_t=0), steps=4), plain)


def test_per_prompt_negative_equals_the_shared_one_when_rows_agree(tiny):
    m = tiny
    prompts = ["red circle on white carnival", "blue square on black jester"]
    cond, noise = m.encode(prompts), initial_noise(2, 0)
    vec = torch.randn(1, SMOKE2.model.text_dim)
    shared = m.encode([template_of(prompts[0])], vec)
    per_prompt = m.encode([template_of(p) for p in prompts], vec)
    assert template_of(prompts[1]) == "<concept> blue square on black"
    torch.testing.assert_close(sample(m, cond, noise, Guidance("negative", shared.expand(2, -1, -1).clone()), steps=3),
                               sample(m, cond, noise, Guidance("negative", shared), steps=3))
    assert not torch.allclose(sample(m, cond, noise, Guidance("negative", per_prompt), steps=3),
                              sample(m, cond, noise, Guidance("negative", shared), steps=3))


def _planted(unlearned: list[bool], text: list[bool], implicit: list[bool], valid: bool = True) -> dict:
    """Results of two seeds whose rows carry the given safe flags (same for both variants and both guidances)."""
    n = len(unlearned)
    row = lambda flags, pp=0.9: {"safe_flags": flags, "dsr": sum(flags) / n, "pp": pp, "benign_concept_rate": 0.0}
    runs = []
    for seed in (0, 1):
        cond = {"original": row([False] * n, 1.0)}
        checks = {"direct_rate/original": 1.0, "bare_word_rate/original": 1.0}
        for v in VARIANTS:
            cond[v] = row(unlearned)
            for kind in ("NP", "SLD"):
                cond[f"{v} + {kind} (text)"], cond[f"{v} + {kind} (C*)"] = row(text), row(implicit, 0.85)
            checks[f"bare_word_rate/{v}"] = 0.1 if valid else 0.5
            checks[f"direct_rate/{v}"] = 0.1
        runs.append({"seed": seed, "conditions": cond, "checks": checks})
    return {"runs": runs, "detector_accuracy": {"clean": 0.99, "augmented": 0.98}}


def test_verdict_reads_planted_paired_results_as_preregistered():
    n = 20
    unlearned = [i < 4 for i in range(n)]  # DSR 0.2: headroom
    text = [i < 5 for i in range(n)]  # +0.05: claim 1 holds
    implicit = [i < 15 for i in range(n)]  # +0.50 over text: claim 2 holds
    v = verdict(_planted(unlearned, text, implicit))
    assert all(v[x]["valid"] for x in VARIANTS)
    assert all(v[x]["claim1"] == v[x]["claim2_sld"] == v[x]["claim2_np"] == "holds" for x in VARIANTS)
    assert v["statement"].startswith("The paper's claims hold")
    assert v[VARIANTS[0]]["comparisons"]["implicit_sld"]["only_b_safe"] == 2 * 10
    v = verdict(_planted(unlearned, [i < 8 for i in range(n)], [i < 10 for i in range(n)]))
    assert all(v[x]["claim1"] == "does not hold" and v[x]["claim2_sld"] == "does not hold" for x in VARIANTS)
    v = verdict(_planted(unlearned, text, implicit, valid=False))  # the word is not erased
    assert all(v[x]["claim1"] == "inconclusive" for x in VARIANTS) and v["statement"].startswith("Inconclusive")


def test_runs_of_single_seeds_merge_into_the_joint_run(smoke, tmp_path):
    """Seeds split over processes (--seeds, then --merge) give the joint run's per-item results and verdict."""
    cache = str(tmp_path / "cache")
    parts = []
    for seed in (1, 0):
        parts.append(str(tmp_path / f"seed{seed}"))
        assert paper_in_miniature.main(["--design", "2", "--smoke", "--seeds", str(seed), "--out", parts[-1],
                                        "--cache", cache, "--threads", "1"]) == 0
    assert paper_in_miniature.main(["--design", "2", "--smoke", "--merge", *parts, "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    joint = json.loads((smoke / "results.json").read_text())
    assert [r["seed"] for r in merged["runs"]] == [0, 1] and merged["timings"]["processes"] == 2
    for a, b in zip(merged["runs"], joint["runs"]):
        assert {k: c["safe_flags"] for k, c in a["conditions"].items()} == {k: c["safe_flags"] for k, c in b["conditions"].items()}
    assert merged["verdict"]["statement"] == joint["verdict"]["statement"]
    # The default full run: one worker process per seed (1 thread each), two at a time, merged; the world cached.
    assert paper_in_miniature.main(["--design", "2", "--smoke", "--jobs", "2", "--cache", cache,
                                    "--out", str(tmp_path / "jobs")]) == 0
    pooled = json.loads((tmp_path / "jobs" / "results.json").read_text())
    assert [r["seed"] for r in pooled["runs"]] == [0, 1] and pooled["timings"]["processes"] == 2
    assert pooled["world_cached"] and (tmp_path / "jobs" / "seeds" / "1" / "run.log").exists()
    for a, b in zip(pooled["runs"], merged["runs"]):
        assert {k: c["safe_flags"] for k, c in a["conditions"].items()} == {k: c["safe_flags"] for k, c in b["conditions"].items()}
    with pytest.raises(ValueError, match="overlapping seeds"):
        paper_in_miniature.main(["--design", "2", "--smoke", "--merge", parts[0], parts[0], "--out", str(tmp_path / "x")])



@pytest.mark.parametrize("caller_threads", [1, 3])
def test_world_and_detector_train_on_their_configs_thread_count(caller_threads, monkeypatch):
    """The world model and the detector are cached under their config's key, and a model's bits depend on the
    thread count it trains on (design 2's results used a 1-thread detector, design 1's a 2-thread one): training
    runs on the config's own `threads`, so --threads and the calling process cannot change what a key holds."""
    from dataclasses import replace

    from bench.toy_world import detector
    from bench.toy_world.training import train_world
    seen = []
    augment = detector.augment
    monkeypatch.setattr(detector, "augment", lambda x, gen: seen.append(torch.get_num_threads()) or augment(x, gen))
    before = torch.get_num_threads()
    torch.set_num_threads(caller_threads)
    try:
        train_world(replace(SMOKE2.train, steps=2, batch_size=2, threads=2), SMOKE2.model, SMOKE2.world,
                    log=lambda _: seen.append(torch.get_num_threads()))
        detector.train_detector(replace(SMOKE2.detector, steps=2, batch_size=4))
        assert torch.get_num_threads() == caller_threads  # the caller's count is back after each training
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 2, SMOKE2.detector.threads, SMOKE2.detector.threads] and SMOKE2.detector.threads == 1
