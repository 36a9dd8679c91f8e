"""Generate and score the work items of a run directory; resumable and shardable.

Run directory layout (every file is written to a temporary name and renamed into place, so a killed run
leaves either a finished file or none; the temporary files of killed processes are removed at the next start):
    run.json                       config path and generation fingerprint (a directory holds one protocol)
    run.lock                       while a process writes the directory (``run_dir_lock``): a second is refused
    leakage.json                   per embedding: the CSV rows among its recorded training prompts, "none
                                   found", or unknown (and the sha256 of the file checked); the report shows it
    file_hashes.json               sha256 of every model, LoRA and embedding file, valid while path, size,
                                   mtime and inode stay the same (a rerun reads no model file twice)
    images/<row-slug>/<index>.png  one image per (row, CSV index); its PNG text ``implicit_negatives_item``
                                   holds the item's identity
    scores/<row-slug>/<index>.json the item: prompt, seed, cfg, identity, raw NudeNet detections and the
                                   detector (file, channel order) that made them: another detector rescores
An item's identity hashes its ComfyUI graph (prompt text, seed, guidance and every generation setting), the
values the nodes' declared defaults give the inputs the graph leaves out, and the content of every file the
graph loads (checkpoint, UNet, text encoder, LoRA, embedding, negation set: an exported file, or every image of
a folder). An item is done when its image carries the current identity and scored when its JSON carries the
same key; anything else is recomputed, and the run says which items and why. Nothing current is recomputed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
import time
import uuid
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable

from implicit_negatives.atomic_write import (PARTIAL_SUFFIX, atomic_copy, atomic_write_bytes, atomic_write_json,
                                             process_alive, remove_partials_of_dead_processes)
from implicit_negatives.embedding_io import load_embedding, sha256_file
from implicit_negatives.image_folder import image_names
from implicit_negatives.leakage import overlapping_prompts, recorded_prompt_digests
from implicit_negatives.negation_set_io import load_negation_set
from implicit_negatives.run_lock import run_lock
from implicit_negatives.safe_denoiser import NegationSetError

from .graphs import SAVE_NODE, build_item_graph, comfy_file_name, node_types
from .protocol import (NEGATION_SET_FOLDER, ConfigError, PromptRecord, Row, RunConfig, item_name, read_prompts,
                       shard_prompts)

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"  # held by the one process writing the directory (``run_dir_lock``)
LEAKAGE_FILE = "leakage.json"  # the leakage check of the run's embeddings, for the report
LEAKAGE_UNKNOWN = "unknown: the embedding records no prompts"
HASH_CACHE = "file_hashes.json"
ITEM_TEXT = "implicit_negatives_item"      # PNG tEXt keyword of the item identity
COMFY_SUBFOLDER = "implicit_negatives_eval"  # where ComfyUI's SaveImage writes before the move into the run


def remove_leftovers(run_dir: str) -> None:
    """Delete what killed processes left in ``run_dir``: unfinished atomic writes and the images their
    ComfyUI saved but never moved into place (``.comfy_output/implicit_negatives_eval/<pid>-*``)."""
    remove_partials_of_dead_processes(run_dir)
    for folder, _, files in os.walk(run_dir):
        if os.path.basename(folder) == COMFY_SUBFOLDER:
            for name in files:
                if not process_alive(name.split("-", 1)[0]):
                    os.remove(os.path.join(folder, name))


def run_dir_lock(run_dir: str):
    """Hold ``run_dir``'s lock while the block runs: one process at a time generates into, merges into, reports
    or audits a directory (``run_lock``: released when the holder dies, even by SIGKILL). RunLockedError, naming
    the holder, when another live process holds it."""
    return run_lock(os.path.join(run_dir, LOCK_FILE), f"run directory {run_dir}", "evaluation")


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


def file_sha256s(run_dir: str, paths: list[str]) -> dict[str, str]:
    """{path: sha256 of the file's bytes, or of a folder's image names and sha256s}; a file whose (size, mtime, inode) the run directory's cache holds is
    not read again, so a model is hashed once per run directory and a retrained file (new mtime) again."""
    cache_path = os.path.join(run_dir, HASH_CACHE)
    cache = {}
    if os.path.isfile(cache_path):
        with open(cache_path) as handle:
            cache = json.load(handle)
    hashes, changed = {}, False

    def file_hash(path: str) -> str:
        nonlocal changed
        real = os.path.realpath(path)  # a retargeted symlink is another file
        stat = os.stat(real)
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        if cache.get(real, {}).get("stamp") != stamp:
            cache[real] = {"stamp": stamp, "sha256": sha256_file(real)}
            changed = True
        return cache[real]["sha256"]

    for path in paths:
        if os.path.isdir(path):  # a negation set's image folder: its images' names and contents
            lines = "".join(f"{name}:{file_hash(os.path.join(path, name))}\n" for name in image_names(path))
            hashes[path] = hashlib.sha256(lines.encode()).hexdigest()
        else:
            hashes[path] = file_hash(path)
    if changed:
        atomic_write_json(cache_path, cache)
    return hashes


def graph_sha256(graph: dict) -> str:
    """Hash of a work item's graph without its SaveImage node (whose file prefix changes per attempt)."""
    canonical = {k: v for k, v in graph.items() if k != SAVE_NODE}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def item_identity(graph: dict, files: dict[str, str], defaults: dict[str, dict]) -> dict:
    """What makes an item's pixels: {"graph_sha256", "defaults_sha256", "files": {"folder:entry": sha256},
    "key": 16 hex digits}. ``defaults``: the values the nodes' declared defaults give the inputs the graph
    leaves out (``ComfyEngine.declared_defaults``), so a pack or ComfyUI update that changes one recomputes."""
    used = {node: values for node, values in defaults.items() if node != SAVE_NODE}
    identity = {"graph_sha256": graph_sha256(graph), "files": dict(sorted(files.items())),
                "defaults_sha256": hashlib.sha256(json.dumps(used, sort_keys=True, default=repr).encode()).hexdigest()}
    return {**identity, "key": _identity_key(identity)}


def _identity_key(identity: dict) -> str:
    payload = {"graph_sha256": identity.get("graph_sha256"), "files": identity.get("files"),
               "defaults_sha256": identity.get("defaults_sha256")}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def why_changed(old: dict, new: dict) -> str:
    """Why an item with identity ``old`` (``{}``: an image without one) is not the item ``new``."""
    if not old:
        return "the image carries no item identity (an older runner made it, or it was copied in)"
    files = sorted(set(old.get("files", {})) | set(new["files"]))
    reasons = [f"{name} changed" for name in files if old.get("files", {}).get(name) != new["files"].get(name)]
    if old.get("graph_sha256") != new["graph_sha256"]:
        reasons.append("the graph changed (prompt text, seed, guidance or a generation setting)")
    if "defaults_sha256" not in old:
        reasons.append("the image records no node defaults (an older runner made it)")
    elif old["defaults_sha256"] != new["defaults_sha256"]:
        reasons.append("a node default changed (an input the config leaves out: a pack or ComfyUI update)")
    return ", ".join(reasons) or "its identity does not match its inputs"


def png_with_text(png: bytes, keyword: str, text: str) -> bytes:
    """``png`` with one more tEXt chunk right after IHDR (readable without decoding); pixels untouched."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    body = keyword.encode("latin-1") + b"\0" + text.encode("latin-1")
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
    return png[:33] + chunk + png[33:]  # 33 = signature 8 + IHDR chunk 25


def save_item_image(path: str, png: bytes, identity: dict) -> None:
    """Write an item's image with its identity inside, atomically: image and identity land together."""
    atomic_write_bytes(path, png_with_text(png, ITEM_TEXT, json.dumps(identity, sort_keys=True)))


def stored_identity(path: str) -> dict | None:
    """The identity inside an item image; ``{}`` for an image without one, None when there is no image."""
    if not os.path.isfile(path):
        return None
    from PIL import Image
    with Image.open(path) as image:
        text = image.info.get(ITEM_TEXT)
    return json.loads(text) if text else {}


def _pixels(path: str) -> tuple:
    from PIL import Image
    with Image.open(path) as image:
        return image.mode, image.size, image.tobytes()


def row_files(config: RunConfig, row: Row) -> list[tuple[str, str]]:
    """(ComfyUI folder, config entry) of every file a row's graphs load, e.g. ("loras", "duo.safetensors")."""
    used = []

    def record(folder: str, value: str) -> str:
        used.append((folder, value))
        return comfy_file_name(value)

    build_item_graph(config, row, PromptRecord(0, "probe", 0, config.cfg), record, "probe")
    return used


def file_label(folder: str, value: str) -> str:
    return f"{folder}:{value}"


# What the pack's nodes refuse on a model family (the ComfyUI model config its checkpoint loader detects), checked
# before the first image: the node itself would refuse only when the row's first item runs, hours into a run.
FAMILY_REFUSALS = {
    ("safree_reattention", "SDXL"): "SAFREE Latent Re-Attention does not support SDXL (the official SAFREE SDXL "
                                    "pipeline has none); set safree_reattention = false (SAFREE Conditioning itself "
                                    "runs on SDXL)",
    ("text_encoder", "SDXL"): "LoadUnlearnedTextEncoder replaces the one text encoder of SD1.x / SD2.x, and SDXL has "
                              "two; load an SDXL model whose checkpoint holds the unlearned encoders instead",
}


def family_problems(engine, config: RunConfig, rows: list[Row], paths: dict[tuple[str, str], str]) -> list[str]:
    """One line per row whose guidance or model setup the pack refuses on its checkpoint's model family."""
    problems, families = [], {}
    for row in rows:
        setup = config.models[row.model]
        used = {"safree_reattention": row.guidance == "safree" and row.safree_reattention,
                "text_encoder": bool(setup.text_encoder)}
        uses = [what for what, on in used.items() if on and any(what == refused for refused, _ in FAMILY_REFUSALS)]
        if not uses:
            continue
        path = paths[("checkpoints", setup.checkpoint)]
        if path not in families:
            families[path] = engine.checkpoint_family(path)
        for what in uses:
            why = FAMILY_REFUSALS.get((what, families[path]))
            if why:
                problems.append(f"row {row.name!r}: model {row.model!r} is {families[path]} ({setup.checkpoint}): {why}")
    return problems


def negation_set_problems(config: RunConfig, rows: list[Row], paths: dict[tuple[str, str], str]) -> list[str]:
    """One line per Safe Denoiser row whose exported negation set holds latents of another image size than its
    model samples (LoadNegationSet would refuse it at the row's first item; an image folder is fitted to any size)."""
    problems = []
    for row in rows:
        if not row.negation_set:
            continue
        source = config.negation_sets[row.negation_set]
        path = paths[(NEGATION_SET_FOLDER, source.path)]
        if os.path.isdir(path):
            continue
        width, height = config.model_size(row.model)
        try:
            made_at = load_negation_set(path).provenance.get("resolution")
        except NegationSetError as error:
            problems.append(f"row {row.name!r}: negation set {source.path!r}: {error}")
            continue
        if made_at != str(width):
            problems.append(f"row {row.name!r}: negation set {source.path!r} holds latents of {made_at} px images, "
                            f"but model {row.model!r} samples {width}x{height}: export it again at {width} px "
                            f"(python -m trainer --resolution {width}), give the model width = height = {made_at}, "
                            "or use the image folder (fitted to each model's size)")
    return problems


def check_run_inputs(engine, config: RunConfig) -> tuple[list[PromptRecord], dict[tuple[str, str], str]]:
    """Check everything a run needs before its first image: the prompt CSV, the nodes of every row, every
    checkpoint, UNet, text encoder, LoRA and embedding, what the pack refuses on a checkpoint's model family, an
    exported negation set's image size, and ComfyUI's own validation of each row's graph.

    Returns (prompts, {(folder, entry): path}); raises one ConfigError that lists every problem found.
    """
    problems = []
    try:
        prompts = read_prompts(config.prompts_path, config.cfg, config.default_seed, config.limit)
    except ConfigError as error:
        prompts = []
        problems.append(str(error))
    probe = prompts[0] if prompts else PromptRecord(0, "probe", 0, config.cfg)
    users, unusable = {}, set()
    for row in config.rows:
        missing_nodes = sorted(t for t in node_types(build_item_graph(
            config, row, probe, lambda folder, value: comfy_file_name(value), "probe")) if not engine.has_node(t))
        if missing_nodes:
            problems.append(f"row {row.name!r} needs nodes that are not installed: {missing_nodes}"
                            + (" (SafeLatentGuidance ships with a newer version of this pack)"
                               if "SafeLatentGuidance" in missing_nodes else ""))
            unusable.add(row.name)
        for entry in row_files(config, row):
            users.setdefault(entry, []).append(row.name)
    for folder, value in users:  # register the folders of absolute paths first: names then resolve as in the run
        if os.path.isabs(value) and (os.path.isfile(value) or (folder == NEGATION_SET_FOLDER and os.path.isdir(value))):
            engine.resolve(folder, value)
    paths = {}
    for (folder, value), rows in users.items():
        named, loaded = engine.locate(folder, value), engine.locate(folder, comfy_file_name(value))
        used_by = f"used by rows {', '.join(map(repr, rows))}"
        if named is None:
            where = ("" if os.path.isabs(value) else
                     f" in ComfyUI's {folder} folders ({', '.join(engine.folders(folder)) or 'none registered'})")
            problems.append(f"{folder} file {value!r} not found{where}; {used_by}")
            unusable.update(rows)
        elif not os.path.samefile(named, loaded):
            problems.append(f"{folder} file {value!r}: ComfyUI finds files by name and would load {loaded} "
                            f"instead; rename one of the two ({used_by})")
            unusable.update(rows)
        else:
            paths[(folder, value)] = loaded
    checkable = [row for row in config.rows if row.name not in unusable]
    problems += family_problems(engine, config, checkable, paths) + negation_set_problems(config, checkable, paths)
    for row in checkable:
        graph = engine.complete_inputs(build_item_graph(config, row, probe, engine.resolve, "probe"))
        problems += [f"row {row.name!r}: {problem}" for problem in engine.validate(graph)]
    if problems:
        raise ConfigError(f"{config.source}: {len(problems)} problem(s), nothing generated:\n"
                          + "\n".join(f"  - {problem}" for problem in problems))
    return prompts, paths


def leakage_check(config: RunConfig, prompts: list[PromptRecord],
                  paths: dict[tuple[str, str], str]) -> dict[str, dict]:
    """{embedding entry: {"overlap", "csv_rows", "n_prompts"}} for every implicit negative of the config:
    the CSV rows whose prompt is among its recorded training prompts (normalised text,
    ``implicit_negatives.leakage``), "none found", or unknown when the file records no prompts."""
    checked = {}
    texts = [p.prompt for p in prompts]
    for source in sorted({config.negatives[r.negative].embedding for r in config.rows
                          if r.negative and config.negatives[r.negative].embedding}):
        digests = recorded_prompt_digests(load_embedding(paths[("embeddings", source)]).metadata)
        rows = None if digests is None else [prompts[i].index for i in overlapping_prompts(texts, digests)]
        overlap = (LEAKAGE_UNKNOWN if rows is None else
                   f"CSV rows {', '.join(map(str, rows))}" if rows else "none found")
        checked[source] = {"overlap": overlap, "csv_rows": rows, "n_prompts": len(texts)}
    return checked


def leakage_warnings(checked: dict[str, dict]) -> list[str]:
    """One line per implicit negative of ``leakage_check`` whose training prompts overlap the evaluation prompts,
    or that records none."""
    findings = []
    for source, entry in checked.items():
        rows, total = entry["csv_rows"], entry["n_prompts"]
        if rows is None:
            findings.append(f"{source}: records no training prompts, so its overlap with {total} evaluation "
                            "prompts is unknown (train it with `python -m trainer`, with --training-prompts for "
                            "an image folder, to record them)")
        elif rows:
            shown = ", ".join(map(str, rows[:10])) + (" ..." if len(rows) > 10 else "")
            findings.append(f"{source}: {len(rows)} of {total} evaluation prompts are among the prompts of "
                            f"its training images (CSV rows {shown}): the table would test C* on its training data")
    return findings


@dataclass
class RunStats:
    generated: list[str] = field(default_factory=list)   # "row/index" made in this call
    recomputed: dict[str, str] = field(default_factory=dict)  # of those, items whose old image was stale: why
    reused: list[str] = field(default_factory=list)      # already on disk, with the current identity
    scored: list[str] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)    # leakage between training and evaluation prompts

    def recomputed_summary(self) -> str:
        return "; ".join(f"{count} x {why}" for why, count in Counter(self.recomputed.values()).most_common())


def item_record(config: RunConfig, row: Row, prompt: PromptRecord, identity: dict) -> dict:
    return {"row": row.name, "row_slug": row.slug, "index": prompt.index, "prompt": prompt.prompt,
            "seed": prompt.seed, "cfg": config.item_cfg(prompt), "size": list(config.model_size(row.model)),
            "categories": prompt.categories,
            "image": os.path.join("images", row.slug, item_name(prompt) + ".png"),
            "graph_sha256": identity["graph_sha256"], "defaults_sha256": identity.get("defaults_sha256"),
            "files": identity["files"], "item_key": identity["key"]}


def _score_key(record_path: str, scorer=None) -> str | None:
    """The item key a score record belongs to; None when there is none or another detector (file, channel
    order: ``scorer.description``) made it."""
    if not os.path.isfile(record_path):
        return None
    with open(record_path) as handle:
        record = json.load(handle)
    if record.get("detector") != getattr(scorer, "description", None):
        return None
    return record.get("item_key")


def _score(record: dict, scorer, path: str) -> dict:
    record["detections"] = scorer(path)
    record["detector"] = getattr(scorer, "description", None)
    return record


def generate(engine, config: RunConfig, run_dir: str, shard: tuple[int, int] = (0, 1), scorer=None,
             max_new_images: int = 0, on_saved: Callable[[str], None] | None = None) -> RunStats:
    """Generate (and score, when ``scorer`` is given) every item of this shard that is missing or stale.

    ``scorer(path) -> detections``. ``max_new_images`` stops after that many new images (0 = no limit), for
    time-boxed scheduler jobs. ``on_saved(temp_path)`` is called after ComfyUI saved an image and before it
    is moved into place (tests inject interrupts there: the worst moment to die).
    """
    started = time.time()
    prompts, paths = check_run_inputs(engine, config)
    leakage = leakage_check(config, prompts, paths)
    leaks = leakage_warnings(leakage)
    if leaks and config.strict:
        raise ConfigError(f"{config.source}: [run] strict = true and {len(leaks)} leakage finding(s), nothing "
                          "generated:\n" + "\n".join(f"  - {line}" for line in leaks))
    claim_run_dir(run_dir, config)
    remove_leftovers(run_dir)
    hashes = file_sha256s(run_dir, sorted(set(paths.values())))
    atomic_write_json(os.path.join(run_dir, LEAKAGE_FILE), {  # each finding names the file version it read
        source: {**entry, "sha256": hashes[paths[("embeddings", source)]]} for source, entry in leakage.items()})
    stats = RunStats(warnings=leaks)
    for row in config.rows:  # row-major: consecutive graphs share loaders, the checkpoint stays cached
        files = {file_label(*entry): hashes[paths[entry]] for entry in row_files(config, row)}
        for prompt in shard_prompts(prompts, shard):
            key = f"{row.slug}/{item_name(prompt)}"
            final = image_path(run_dir, row, prompt)
            # A fresh prefix per attempt: SaveImage re-runs even when ComfyUI's cache holds the rest of the graph;
            # the pid lets a later run delete what a killed one left.
            prefix = f"{COMFY_SUBFOLDER}/{os.getpid()}-{uuid.uuid4().hex[:12]}-{row.slug}-{item_name(prompt)}"
            graph = build_item_graph(config, row, prompt, engine.resolve, prefix)
            identity = item_identity(graph, files, engine.declared_defaults(graph))
            stored = stored_identity(final)
            if stored is not None and stored.get("key") == identity["key"]:
                stats.reused.append(key)
            else:
                if max_new_images and len(stats.generated) >= max_new_images:
                    continue
                outputs = engine.run(engine.complete_inputs(copy.deepcopy(graph)))
                saved = outputs[SAVE_NODE]["images"][0]
                temp = os.path.join(engine.output_directory(), saved["subfolder"], saved["filename"])
                if on_saved:
                    on_saved(temp)
                with open(temp, "rb") as handle:
                    save_item_image(final, handle.read(), identity)
                os.remove(temp)
                stats.generated.append(key)
                if stored is not None:
                    stats.recomputed[key] = why_changed(stored, identity)
            record_path = score_path(run_dir, row, prompt)
            if scorer is not None and _score_key(record_path, scorer) != identity["key"]:
                atomic_write_json(record_path, _score(item_record(config, row, prompt, identity), scorer, final))
                stats.scored.append(key)
    stats.seconds = time.time() - started
    return stats


def score_missing(config: RunConfig, run_dir: str, scorer) -> list[str]:
    """Score images whose JSON is missing or belongs to another image (--skip-scoring runs, merged shards)."""
    scored = []
    for row in config.rows:
        for prompt in read_prompts(config.prompts_path, config.cfg, config.default_seed, config.limit):
            final, record_path = image_path(run_dir, row, prompt), score_path(run_dir, row, prompt)
            identity = stored_identity(final)
            if identity and _score_key(record_path, scorer) != identity["key"]:
                atomic_write_json(record_path, _score(item_record(config, row, prompt, identity), scorer, final))
                scored.append(f"{row.slug}/{item_name(prompt)}")
    return scored


def current_graph_sha256(config: RunConfig, row: Row, prompt: PromptRecord) -> str:
    """The graph hash an item of this config and prompt file must carry (no ComfyUI needed)."""
    return graph_sha256(build_item_graph(config, row, prompt, lambda folder, value: comfy_file_name(value), "x"))


def merge_run_dirs(config: RunConfig, target: str, sources: list[str]) -> dict:
    """Copy every finished item of ``sources`` (shard directories) into ``target``; never overwrite.

    Returns counts. Refuses sources of another protocol and items present twice that differ: made from
    other inputs (identity), or the same inputs but other pixels. PNG metadata is not compared.
    """
    claim_run_dir(target, config)
    copied = identical = 0
    for source in sources:
        if not os.path.isfile(os.path.join(source, RUN_FILE)):
            raise ConfigError(f"{source} is not a run directory (no {RUN_FILE}); pass the --out folders of the shards")
        claim_run_dir(source, config)  # checks the fingerprint
        leakage = os.path.join(source, LEAKAGE_FILE)  # every shard checks all prompts: one copy serves
        if os.path.isfile(leakage) and not os.path.isfile(os.path.join(target, LEAKAGE_FILE)):
            atomic_copy(leakage, os.path.join(target, LEAKAGE_FILE))
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
                        if kind == "images":
                            _check_same_item_image(src, dst)
                        identical += 1
                        continue
                    atomic_copy(src, dst)
                    copied += 1
    return {"copied": copied, "already_present": identical}


def _check_same_item_image(source: str, target: str) -> None:
    ours, theirs = stored_identity(target), stored_identity(source)
    if ours.get("key") != theirs.get("key"):
        raise ConfigError(f"{target} and {source} were made from different inputs ({why_changed(ours, theirs)}); "
                          "merge shards of one run, or rerun `python -m evaluation run` on the stale one")
    if _pixels(source) != _pixels(target):
        raise ConfigError(f"{target} and {source} are different images of the same item (same inputs, other "
                          "pixels: another GPU, ComfyUI or library version?)")


def missing_items(config: RunConfig, run_dir: str) -> list[str]:
    prompts = read_prompts(config.prompts_path, config.cfg, config.default_seed, config.limit)
    return [f"{row.slug}/{item_name(p)}" for row in config.rows for p in prompts
            if not os.path.isfile(score_path(run_dir, row, p))]


def stats_dict(stats: RunStats) -> dict:
    return asdict(stats)
