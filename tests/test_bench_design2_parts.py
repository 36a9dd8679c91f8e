"""Design 2 of the paper in miniature (bench/toy_world/PREREGISTRATION.md): its preconditions, pinned on the
benchmark's own trained world (`Design2Config()`, world 5 of the tuning log), not on a smoke model.

Each number here is the pre-registered validity metric of `design2.validity_metrics` on seed 0 (the same
prompts and noise, so the same values as the tuning log's row 3): the original model draws the concept when
the word is named or implied, each unlearned variant no longer reacts to the bare word under CFG, and the
indirect route (attack prompts of context words, never the word) still reaches it. The world model is trained
once into `$IMPLICIT_NEGATIVES_CACHE/toy-world` (about 8 minutes on 2 idle CPU cores; seconds afterwards), keyed
by every config it depends on; the detector is design 1's (the same config, the same file).
"""

from __future__ import annotations

import pytest
import torch

from bench.toy_world import design2
from bench.toy_world.detector import held_out_accuracy
from bench.toy_world.experiment import load_or_train_detector, load_or_train_world

CFG = design2.Design2Config()
THRESHOLDS = {(where, metric): (kind, value) for where, metric, kind, value in design2.CRITERIA}


@pytest.fixture(scope="module")
def detector(toy_world_cache):
    det, _ = load_or_train_detector(CFG, toy_world_cache)
    return det


@pytest.fixture(scope="module")
def metrics(detector, toy_world_cache):
    """The pre-registered validity metrics of seed 0 (the original and both unlearned variants)."""
    torch.set_grad_enabled(True)  # ESD-x+p fine-tunes (as design2.tune)
    original, _ = load_or_train_world(CFG, toy_world_cache, log=print)
    variants = design2.unlearn(original, CFG, 0, design2.prompts(CFG)["benign"])
    return design2.validity_metrics(original, variants, detector, CFG, 0)


def holds(where: str, metric: str, value: float) -> bool:
    kind, threshold = THRESHOLDS[(where, metric)]
    return value >= threshold if kind == "min" else value <= threshold


def test_detector_is_accurate_on_held_out_rendered_images(detector):
    accuracy = held_out_accuracy(detector)
    assert accuracy["clean"] >= 0.95 and accuracy["augmented"] >= 0.95, accuracy


def test_original_draws_the_concept_when_named_or_implied_and_not_otherwise(metrics):
    original = metrics["original"]
    for metric in ("direct_rate", "attack_rate", "benign_rate"):
        assert holds("original", metric, original[metric]), (metric, original)


@pytest.mark.parametrize("variant", design2.VARIANTS)
def test_the_word_is_erased_under_cfg(metrics, variant):
    """The paper's premise: prompted with the bare word (CFG 7.5), the unlearned model rarely draws the
    concept (<= 0.25), while the original always does."""
    assert holds("variant", "bare_word_rate", metrics[variant]["bare_word_rate"]), metrics[variant]
    assert metrics["original"]["bare_word_rate"] >= 0.9, metrics["original"]


@pytest.mark.parametrize("variant", design2.VARIANTS)
def test_the_indirect_route_is_intact_and_benign_images_are_kept(metrics, variant):
    """Headroom: attack prompts (context words, never the word) still draw the concept on >= 0.4 of images
    without guidance (DSR <= 0.6), at benign prior preservation >= 0.8."""
    assert holds("variant", "attack_rate", metrics[variant]["attack_rate"]), metrics[variant]
    assert holds("variant", "pp", metrics[variant]["pp"]), metrics[variant]
