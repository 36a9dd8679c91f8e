"""``python -m evaluation``: run the protocol, merge shards, write the report, or score a folder of images.

    python -m evaluation run CONFIG.toml --out RUN_DIR [--shard i/n|auto] [--comfyui PATH] [--skip-scoring]
    python -m evaluation merge CONFIG.toml --out RUN_DIR SHARD_DIR [SHARD_DIR ...]
    python -m evaluation report CONFIG.toml --out RUN_DIR
    python -m evaluation score IMAGE_DIR [--label-set nudenet5@0.6 ...] [--json scores.json]
    python -m evaluation q16 IMAGE_DIR --clip CLIP_VIT_L14_DIR --prompts q16_prompts.safetensors [--json FILE]
    python -m evaluation convert-q16 prompts.p q16_prompts.safetensors
    python -m evaluation audit AUDIT.toml --out AUDIT_DIR [--sharp-thumbnails] [--comfyui PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from implicit_negatives.metrics import DEFAULT_LABEL_SET, PRESETS, format_dsr, summarize_detections, wilson_interval
from implicit_negatives.comfyui.headless import EngineError
from implicit_negatives.nudenet_scorer import CHANNEL_ORDERS
from implicit_negatives.run_lock import RunLockedError
from .protocol import ConfigError, load_config, parse_shard, shard_from_environment
from .q16_scorer import Q16Unavailable

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _scorer(model_path: str = "", channel_order: str = "rgb"):
    from implicit_negatives.nudenet_scorer import FileScorer
    try:
        scorer = FileScorer(model_path or None, channel_order)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(str(error)) from None
    return scorer, scorer.description


def _report(config, run_dir) -> dict:
    from .report import print_summary, write_report
    from .runner import score_missing
    scorer, described = _scorer(config.detector_model, config.channel_order)
    score_missing(config, run_dir, scorer)
    results = write_report(config, run_dir, described)
    print(print_summary(results))
    print(f"wrote {os.path.join(run_dir, 'results.md')}, results.csv, results.json, grids/, dsr_chart.png")
    return results


@contextlib.contextmanager
def _locked(run_dir: str):
    """Hold ``run_dir``'s lock (``runner.run_dir_lock``); say so when a process that died held it last. A folder
    that the lock alone created is removed again when the command wrote nothing into it (e.g. it stopped on a
    check before the first image), so a failed command leaves no empty run directory behind."""
    from .runner import run_dir_lock
    existed = os.path.isdir(run_dir)
    try:
        with run_dir_lock(run_dir) as dead:
            if dead:
                print(f"note: took over {run_dir} from a process that died ({dead})", file=sys.stderr)
            yield
    finally:
        if not existed:
            with contextlib.suppress(OSError):  # not empty: the command wrote something, keep it
                os.rmdir(run_dir)


def command_run(args) -> int:
    config = load_config(args.config)
    shard = shard_from_environment(os.environ) if args.shard == "auto" else parse_shard(args.shard)
    out = args.out.replace("{rank}", str(shard[0]))
    with _locked(out):
        return _run(args, config, shard, out)


def _run(args, config, shard, out) -> int:
    from .engine import ComfyEngine
    from .runner import generate
    if args.shard == "auto" and "LOCAL_RANK" in os.environ and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ["LOCAL_RANK"]  # torchrun: one GPU per process
    scorer = described = None
    if not args.skip_scoring:
        scorer, described = _scorer(config.detector_model, config.channel_order)  # fail before generating
    engine = ComfyEngine(args.comfyui, output_dir=os.path.join(out, ".comfy_output"))
    stats = generate(engine, config, out, shard, scorer, args.max_new_images)
    for line in stats.warnings:
        print(f"warning: leakage: {line}", file=sys.stderr)
    recomputed = f" ({len(stats.recomputed)} recomputed: {stats.recomputed_summary()})" if stats.recomputed else ""
    print(f"shard {shard[0]}/{shard[1]}: generated {len(stats.generated)}{recomputed}, already done "
          f"{len(stats.reused)}, scored {len(stats.scored)} in {stats.seconds:.1f} s")
    if shard[1] == 1 and not args.skip_scoring and not args.max_new_images:
        _report(config, out)
    elif shard[1] > 1:
        print(f"when every shard is done: python -m evaluation merge {args.config} --out MERGED_DIR SHARD_DIRS...")
    return 0


def command_merge(args) -> int:
    from .runner import merge_run_dirs
    config = load_config(args.config)
    with _locked(args.out):
        counts = merge_run_dirs(config, args.out, args.sources)
        print(f"merged {len(args.sources)} directories into {args.out}: {counts}")
        _report(config, args.out)
    return 0


def command_report(args) -> int:
    config = load_config(args.config)
    with _locked(args.out):
        _report(config, args.out)
    return 0


def command_audit(args) -> int:
    from .audit import load_audit_config, run_audit
    from .engine import ComfyEngine
    audit = load_audit_config(args.config)
    if args.sharp_thumbnails:
        audit.sharp_thumbnails = True
    scorer, described = _scorer()
    with _locked(args.out):
        engine = ComfyEngine(args.comfyui, output_dir=os.path.join(args.out, ".comfy_output"))
        stats, results = run_audit(engine, audit, args.out, scorer, described, args.max_new_images)
    print(f"audit: generated {len(stats.generated)}, already done {len(stats.reused)}, scored {len(stats.scored)} "
          f"in {stats.seconds:.1f} s")
    if results is None:
        print("stopped at --max-new-images; rerun the same command to continue")
        return 0
    for setup, entry in results["setups"].items():
        print(f"{setup}: " + "; ".join(f"{group} {rate['rate']:.3f} [{rate['ci95'][0]:.3f}, {rate['ci95'][1]:.3f}]"
                                       for group, rate in entry["rates"].items()))
    print(f"concept rate = share flagged, {results['label_set']}")
    print(f"wrote {os.path.join(args.out, 'audit.md')}, audit.json, audit_grid.png")
    return 0


def command_score(args) -> int:
    from implicit_negatives.nudenet_scorer import describe_detector
    scorer, described = _scorer(args.detector_model, args.channel_order)
    names = _image_names(args.images)
    detections = [scorer(os.path.join(args.images, name)) for name in names]
    summaries = [summarize_detections(detections, spec) for spec in args.label_set or [DEFAULT_LABEL_SET]]
    for summary in summaries:
        print(format_dsr(summary, describe_detector(described)))
    if args.json:
        from implicit_negatives.atomic_write import atomic_write_json
        atomic_write_json(args.json, {"detector": described, "summaries": summaries,
                                      "images": [{"image": n, "detections": d} for n, d in zip(names, detections)]})
    return 0


def _image_names(folder: str) -> list[str]:
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise ConfigError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return names


def command_q16(args) -> int:
    import numpy as np
    from PIL import Image
    from .q16_scorer import Q16Classifier
    classifier = Q16Classifier(args.clip, args.prompts, args.device)
    names = _image_names(args.images)
    results = []
    for start in range(0, len(names), 16):
        batch = []
        for name in names[start:start + 16]:
            with Image.open(os.path.join(args.images, name)) as handle:
                batch.append(np.asarray(handle.convert("RGB")))
        results += classifier.classify(batch)
    safe = sum(not r["inappropriate"] for r in results)
    low, high = wilson_interval(safe, len(results))
    print(f"Q16 safe rate {safe / len(results):.3f} [{low:.3f}, {high:.3f}] ({safe}/{len(results)} not "
          f"inappropriate) | Q16 prompts {os.path.basename(args.prompts)}, CLIP {args.clip}")
    if args.json:
        from implicit_negatives.atomic_write import atomic_write_json
        atomic_write_json(args.json, [{"image": n, **r} for n, r in zip(names, results)])
    return 0


def command_convert_q16(args) -> int:
    from .q16_scorer import convert_q16_pickle
    array = convert_q16_pickle(args.source, args.target)
    print(f"wrote {args.target}: Q16 prompts {array.shape}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = top.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="generate and score the items of a config (resumable)")
    run.add_argument("config")
    run.add_argument("--out", required=True,
                     help="run directory (created; reopened to resume); '{rank}' is replaced by the shard index")
    run.add_argument("--shard", default="0/1",
                     help="i/n: this job's share of the prompts (round robin); auto: from torchrun or a SLURM array")
    run.add_argument("--comfyui", default=None, help="ComfyUI source tree (default $COMFYUI_PATH)")
    run.add_argument("--skip-scoring", action="store_true", help="only generate (score later with report/merge)")
    run.add_argument("--max-new-images", type=int, default=0, help="stop after this many new images (0 = all)")
    run.set_defaults(handler=command_run)
    merge = commands.add_parser("merge", help="copy finished shard directories into one and write the report")
    merge.add_argument("config")
    merge.add_argument("--out", required=True)
    merge.add_argument("sources", nargs="+")
    merge.set_defaults(handler=command_merge)
    report = commands.add_parser("report", help="(re)write the table, grids and chart of a finished run")
    report.add_argument("config")
    report.add_argument("--out", required=True)
    report.set_defaults(handler=command_report)
    score = commands.add_parser("score", help="NudeNet DSR of a folder of images")
    score.add_argument("images")
    score.add_argument("--label-set", action="append",
                       help=f"preset ({', '.join(PRESETS)}), FAMILY@T or LABELS@T; repeatable")
    score.add_argument("--json", help="write per-image detections and summaries here")
    score.add_argument("--detector-model", default="", help="NudeNet ONNX file, e.g. 640m.onnx (default: bundled 320n)")
    score.add_argument("--channel-order", default="rgb", choices=CHANNEL_ORDERS,
                       help="what the detector sees: rgb (as trained; default) or bgr_nudenet_3_4 (nudenet 3.4.x "
                            "on an image file)")
    score.set_defaults(handler=command_score)
    q16 = commands.add_parser("q16", help="Q16 inappropriate rate of a folder (local CLIP + Q16 prompts)")
    q16.add_argument("images")
    q16.add_argument("--clip", required=True, help="local transformers CLIP ViT-L/14 folder")
    q16.add_argument("--prompts", required=True, help="Q16 prompts as .safetensors or .npy (see convert-q16)")
    q16.add_argument("--device", default="cpu")
    q16.add_argument("--json")
    q16.set_defaults(handler=command_q16)
    convert = commands.add_parser("convert-q16", help="Q16 prompts.p -> .safetensors without running pickled code")
    convert.add_argument("source")
    convert.add_argument("target")
    convert.set_defaults(handler=command_convert_q16)
    audit = commands.add_parser("audit", help="erasure audit: concept rate under C*, the word and benign prompts "
                                              "per model setup, vs the original model (resumable)")
    audit.add_argument("config")
    audit.add_argument("--out", required=True, help="audit directory (created; reopened to resume)")
    audit.add_argument("--comfyui", default=None, help="ComfyUI source tree (default $COMFYUI_PATH)")
    audit.add_argument("--sharp-thumbnails", action="store_true",
                       help="show the example thumbnails unblurred (default: every thumbnail is blurred)")
    audit.add_argument("--max-new-images", type=int, default=0, help="stop after this many new images (0 = all)")
    audit.set_defaults(handler=command_audit)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, EngineError, ImportError, Q16Unavailable, RunLockedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

