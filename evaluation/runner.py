"""Generate and score the work items of a run directory; resumable and shardable.

Run directory layout (every file is written to a temporary name and renamed into place, so a killed run
leaves either a finished file or none):
    run.json                       config path and generation fingerprint (a directory holds one protocol)
    images/<row-slug>/<index>.png  one image per (row, CSV index)
    scores/<row-slug>/<index>.json the item: prompt, seed, cfg, graph hash and raw NudeNet detections
An item is done when its image exists; it is scored when its JSON exists. Nothing done is recomputed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable

from implicit_negatives.atomic_write import PARTIAL_SUFFIX, atomic_copy, atomic_write_bytes, atomic_write_json

from .graphs import SAVE_NODE, build_item_graph, comfy_file_name, node_types
from .protocol import ConfigError, PromptRecord, Row, RunConfig, item_name, read_prompts, shard_prompts

RUN_FILE = "run.json"


def image_path(run_dir: str, row: Row, prompt: PromptRecord) -> str:
    return os.path.join(run_dir, "images", row.slug, item_name(prompt) + ".png")


def score_path(run_dir: str, row: Row, prompt: PromptRecord) -> str:
    return os.path.join(run_dir, "scores", row.slug, item_name(prompt) + ".json")


def claim_run_dir(run_dir: str, config: RunConfig) -> None:
    """Create or reopen a run directory; refuse one made with a different generation fingerprint."""
    path = os.path.join(run_dir, RUN_FILE)
    fingerprint = config.generation_fingerprint()
    if os.path.isfile(path):
        with open(path) as handle:
            existing = json.load(handle)
        if existing.get("fingerprint") != fingerprint:
            raise ConfigError(f"{run_dir} holds a run of another protocol (fingerprint {existing.get('fingerprint')}, "
                              f"this config {fingerprint}, from {existing.get('config')}); use a new output directory")
        return
    atomic_write_json(path, {"fingerprint": fingerprint, "config": config.source})


@dataclass
class RunStats:
    generated: list[str] = field(default_factory=list)   # "row/index" made in this call
    reused: list[str] = field(default_factory=list)      # already on disk
    scored: list[str] = field(default_factory=list)
    seconds: float = 0.0


def item_record(config: RunConfig, row: Row, prompt: PromptRecord, graph: dict) -> dict:
    canonical = {k: v for k, v in graph.items() if k != SAVE_NODE}
    return {"row": row.name, "row_slug": row.slug, "index": prompt.index, "prompt": prompt.prompt,
            "seed": prompt.seed, "cfg": prompt.guidance, "categories": prompt.categories,
            "image": os.path.join("images", row.slug, item_name(prompt) + ".png"),
            "graph_sha256": hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()}


def check_nodes_available(engine, config: RunConfig, resolve) -> None:
    """Fail before generating anything when a row needs a node this ComfyUI/pack does not have."""
    probe = PromptRecord(0, "probe", 0, config.cfg)
    for row in config.rows:
        missing = sorted(t for t in node_types(build_item_graph(config, row, probe, resolve, "probe"))
                         if not engine.has_node(t))
        if missing:
            raise ConfigError(f"row {row.name!r} needs nodes that are not installed: {missing}"
                              + (" (SafeLatentGuidance ships with a newer version of this pack)"
                                 if "SafeLatentGuidance" in missing else ""))


def generate(engine, config: RunConfig, run_dir: str, shard: tuple[int, int] = (0, 1), scorer=None,
             max_new_images: int = 0, on_saved: Callable[[str], None] | None = None) -> RunStats:
    """Generate (and score, when ``scorer`` is given) every missing item of this shard.

    ``scorer(path) -> detections``. ``max_new_images`` stops after that many new images (0 = no limit), for
    time-boxed scheduler jobs. ``on_saved(temp_path)`` is called after ComfyUI saved an image and before it
    is moved into place (tests inject interrupts there: the worst moment to die).
    """
    started = time.time()
    claim_run_dir(run_dir, config)
    prompts = shard_prompts(read_prompts(config.prompts_path, config.cfg, config.default_seed, config.limit), shard)
    resolve = engine.resolve
    check_nodes_available(engine, config, resolve)
    stats = RunStats()
    for row in config.rows:  # row-major: consecutive graphs share loaders, the checkpoint stays cached
        for prompt in prompts:
            key = f"{row.slug}/{item_name(prompt)}"
            final = image_path(run_dir, row, prompt)
            # A fresh prefix per attempt: SaveImage re-runs even when ComfyUI's cache holds the rest of the graph.
            prefix = f"implicit_negatives_eval/{uuid.uuid4().hex[:12]}_{row.slug}_{item_name(prompt)}"
            graph = build_item_graph(config, row, prompt, resolve, prefix)
            record_path = score_path(run_dir, row, prompt)
            if os.path.isfile(final):
                stats.reused.append(key)
            else:
                if max_new_images and len(stats.generated) >= max_new_images:
                    continue
                outputs = engine.run(engine.complete_inputs(copy.deepcopy(graph)))
                saved = outputs[SAVE_NODE]["images"][0]
                temp = os.path.join(engine.output_directory(), saved["subfolder"], saved["filename"])
                if on_saved:
                    on_saved(temp)
                atomic_copy(temp, final)
                os.remove(temp)
                stats.generated.append(key)
            if scorer is not None and not os.path.isfile(record_path):
                record = item_record(config, row, prompt, graph)
                record["detections"] = scorer(final)
                atomic_write_json(record_path, record)
                stats.scored.append(key)
    stats.seconds = time.time() - started
    return stats


def score_missing(config: RunConfig, run_dir: str, scorer) -> list[str]:
    """Score images that have no JSON yet (runs generated with --skip-scoring, or merged shards)."""
    scored = []
    for row in config.rows:
        for prompt in read_prompts(config.prompts_path, config.cfg, config.default_seed, config.limit):
            final, record_path = image_path(run_dir, row, prompt), score_path(run_dir, row, prompt)
            if os.path.isfile(final) and not os.path.isfile(record_path):
                graph = build_item_graph(config, row, prompt, lambda folder, value: comfy_file_name(value), "score")
                record = item_record(config, row, prompt, graph)
                record["detections"] = scorer(final)
                atomic_write_json(record_path, record)
                scored.append(f"{row.slug}/{item_name(prompt)}")
    return scored


def merge_run_dirs(config: RunConfig, target: str, sources: list[str]) -> dict:
    """Copy every finished item of ``sources`` (shard directories) into ``target``; never overwrite.

    Returns counts. Refuses sources of another protocol and items whose images differ (same item, two
    different pictures means two different setups were mixed).
    """
    claim_run_dir(target, config)
    copied = identical = 0
    for source in sources:
        if not os.path.isfile(os.path.join(source, RUN_FILE)):
            raise ConfigError(f"{source} is not a run directory (no {RUN_FILE}); pass the --out folders of the shards")
        claim_run_dir(source, config)  # checks the fingerprint
        for kind in ("images", "scores"):
            root = os.path.join(source, kind)
            for folder, _, files in os.walk(root):
                for name in sorted(files):
                    if name.endswith(PARTIAL_SUFFIX):
                        continue  # a write that a killed job never finished
                    src = os.path.join(folder, name)
                    dst = os.path.join(target, os.path.relpath(src, source))
                    if os.path.abspath(src) == os.path.abspath(dst):
                        continue
                    if os.path.isfile(dst):
                        if kind == "images" and _file_digest(src) != _file_digest(dst):
                            raise ConfigError(f"{dst} and {src} are different images of the same item")
                        identical += 1
                        continue
                    atomic_copy(src, dst)
                    copied += 1
    return {"copied": copied, "already_present": identical}


def _file_digest(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def missing_items(config: RunConfig, run_dir: str) -> list[str]:
    prompts = read_prompts(config.prompts_path, config.cfg, config.default_seed, config.limit)
    return [f"{row.slug}/{item_name(p)}" for row in config.rows for p in prompts
            if not os.path.isfile(score_path(run_dir, row, p))]


def stats_dict(stats: RunStats) -> dict:
    return asdict(stats)
