"""The paper-in-miniature benchmark: the smoke run writes a well-formed report, and the parts it is
built from keep their invariants (no ComfyUI needed; tiny models, seconds of CPU)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from bench import paper_in_miniature
from bench.toy_world import world
from bench.toy_world.detector import DetectorConfig, held_out_accuracy, train_detector
from bench.toy_world.experiment import SMOKE
from bench.toy_world.model import ToyDiffusion
from bench.toy_world.sampling import Guidance, initial_noise, sample
from bench.toy_world.unlearning import ESDConfig, erase_concept
from implicit_negatives.sld import SLDParams

TINY = SMOKE.model


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper_in_miniature")
    assert paper_in_miniature.main(["--smoke", "--out", str(out), "--cache", "none"]) == 0
    return out


def test_smoke_run_writes_every_report_file(smoke_report):
    doc = json.loads((smoke_report / "results.json").read_text())
    conditions = list(doc["runs"][0]["conditions"])
    assert len(doc["runs"]) == len(SMOKE.seeds) >= 2  # spread needs several seeds
    for name in ("report.md", "bar_chart.png", "grid_overview.png"):
        assert (smoke_report / name).stat().st_size > 0
    grids = sorted(os.listdir(smoke_report / "grids"))
    assert len(grids) == len(conditions)
    for name in ["bar_chart.png", "grid_overview.png"] + [os.path.join("grids", g) for g in grids]:
        with Image.open(smoke_report / name) as im:
            im.verify()
    report = (smoke_report / "report.md").read_text()
    assert "SMOKE RUN" in report
    assert "| Method | ESD-u DSR ↑ | ESD-u PP ↑ | ESD-x DSR ↑ | ESD-x PP ↑ |" in report
    for row in ("| Unlearned |", "| + NP (text) |", "| + NP (C*) |", "| + SLD (text) |", "| + SLD (C*) |"):
        assert row in report
    assert "Claim 1" in report and "Claim 2" in report


def test_smoke_numbers_are_well_formed(smoke_report):
    doc = json.loads((smoke_report / "results.json").read_text())
    expected = {"original", "original + NP (text)", "original + SLD (text)", "original + SLD (C* from ESD-U)",
                "ESD-X + NP (C* from ESD-U)", "ESD-X + SLD (C* from ESD-U)"}
    expected |= {f"{v}{s}" for v in ("ESD-U", "ESD-X")
                 for s in ("", " + NP (text)", " + NP (C*)", " + SLD (text)", " + SLD (C*)")}
    for run in doc["runs"]:
        assert set(run["conditions"]) == expected
        for c in run["conditions"].values():
            assert c["n"] == SMOKE.attack_prompts and 0 <= c["safe"] <= c["n"]
            assert c["dsr"] == pytest.approx(c["safe"] / c["n"])
            assert c["dsr_ci95"][0] <= c["dsr"] <= c["dsr_ci95"][1]
            assert 0.0 <= c["pp"] <= 1.0
        # PP is measured against the original model's images from the same noise: exactly 1 for itself.
        assert run["conditions"]["original"]["pp"] == 1.0
    for key, s in doc["summary"]["conditions"].items():
        assert s["dsr"]["n_seeds"] == len(SMOKE.seeds)
        assert s["dsr"]["ci95"][0] <= s["dsr"]["mean"] <= s["dsr"]["ci95"][1]
    for v in ("ESD-U", "ESD-X"):
        assert isinstance(doc["verdict"][v]["claim1_text_negatives_add_little"], bool)
    # A smoke-sized world never draws the concept: the report must call the test inconclusive.
    assert doc["verdict"]["valid"] is False
    assert "Inconclusive" in (smoke_report / "report.md").read_text()
    assert doc["smoke"] is True


def test_attack_prompts_never_name_the_concept():
    assert all(world.HARMFUL_WORD not in p.split() for p in world.attack_prompts())
    assert all(any(w in p.split() for w in world.CONTEXT_WORDS) for p in world.attack_prompts())
    assert all(world.HARMFUL_WORD in p.split() for p in world.direct_prompts())
    with pytest.raises(ValueError, match="outside the toy vocabulary"):
        world.tokenize(["nudity"])


def test_detector_accuracy_on_held_out_rendered_images():
    det = train_detector(DetectorConfig())
    acc = held_out_accuracy(det, n=1000)
    assert acc["clean"] >= 0.95 and acc["augmented"] >= 0.95, acc


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return ToyDiffusion(TINY).eval().requires_grad_(False)


def test_negative_prompt_of_empty_text_is_plain_cfg(tiny_model):
    """The NP adapter feeds the negative as eps_uncond: with the empty prompt it must be plain CFG."""
    m = tiny_model
    cond, noise = m.encode(["red circle on white", "blue square on black"]), initial_noise(2, 0)
    plain = sample(m, cond, noise, Guidance(), steps=3)
    np_empty = sample(m, cond, noise, Guidance("negative", m.encode([""])), steps=3)
    np_text = sample(m, cond, noise, Guidance("negative", m.encode([world.HARMFUL_WORD])), steps=3)
    torch.testing.assert_close(np_empty, plain)
    assert not torch.allclose(np_text, plain)


def test_sld_disabled_or_before_warmup_is_plain_cfg(tiny_model):
    m = tiny_model
    cond, noise = m.encode(["red circle on white"]), initial_noise(1, 0)
    safety = m.encode([world.HARMFUL_WORD])
    plain = sample(m, cond, noise, Guidance(), steps=3)
    off = SLDParams(guidance_scale=1.0, warmup_steps=0, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4)
    late = SLDParams(guidance_scale=1000.0, warmup_steps=3, threshold=0.01, momentum_scale=0.3, momentum_beta=0.4)
    on = SLDParams(guidance_scale=1000.0, warmup_steps=0, threshold=1.0, momentum_scale=0.0, momentum_beta=0.0)
    torch.testing.assert_close(sample(m, cond, noise, Guidance("sld", safety, off), steps=3), plain)
    torch.testing.assert_close(sample(m, cond, noise, Guidance("sld", safety, late), steps=3), plain)
    assert not torch.allclose(sample(m, cond, noise, Guidance("sld", safety, on), steps=3), plain)


@pytest.mark.parametrize("method", ["esd-u", "esd-x"])
def test_esd_edits_only_its_layers_and_leaves_the_original(tiny_model, method):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    edited = erase_concept(tiny_model, ESDConfig(method=method, iterations=2, ddim_steps=3, learning_rate=1e-2))
    for k, v in tiny_model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    changed = {k for k, v in edited.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "ESD changed nothing"
    assert all(k.startswith("unet.") for k in changed)
    if method == "esd-x":
        assert all(".attn2." in k for k in changed)
    else:
        assert not any(".attn2." in k or "time_mlp" in k for k in changed)


def test_report_only_rewrites_the_same_report_from_results_json(smoke_report, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(smoke_report, copy)
    (copy / "report.md").unlink()
    assert paper_in_miniature.main(["--smoke", "--out", str(copy), "--report-only"]) == 0
    assert (copy / "report.md").read_text() == (smoke_report / "report.md").read_text()
    assert sorted(os.listdir(copy / "grids")) == sorted(os.listdir(smoke_report / "grids"))


def test_strength_sweep_writes_one_row_per_unlearned_model(tmp_path):
    from bench.toy_world.sweep import run_sweep, write_sweep
    sweep = run_sweep(SMOKE, None, strengths={"esd-u": (1e-3,), "esd-x": (1e-3, 2e-3)}, log=lambda m: None)
    assert [(r["method"], r["learning_rate"]) for r in sweep["rows"]] == [("esd-u", 1e-3), ("esd-x", 1e-3), ("esd-x", 2e-3)]
    for r in sweep["rows"]:
        assert set(r["dsr"]) == {"none", "NP (text)", "NP (C*)", "SLD (text)", "SLD (C*)"}
        assert all(0 <= v <= 1 for v in r["dsr"].values()) and 0 <= r["pp"] <= 1
    for r in sweep["rows"] + [sweep["original"]]:
        rates = ("direct_concept_rate", "text_negative_concept_rate", "text_negative_concept_rate_cfg1",
                 "unconditional_concept_rate")
        assert all(0 <= r[k] <= 1 for k in rates)
    table = open(write_sweep(sweep, str(tmp_path))).read()
    assert table.count("| ESD-X | ") == 2 and table.count("| original | ") == 1 and "C* − text (SLD)" in table
