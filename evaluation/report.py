"""Results of a finished run directory: the paper-layout table (Markdown + CSV), JSON, grids, bar chart.

Everything is recomputed from ``scores/*/*.json`` and ``images/``, so a merged directory and an unsharded
one give identical numbers. Every DSR carries its label set and threshold; PP is a number only when LPIPS
weights exist locally, otherwise the literal text "unavailable" plus the reason.
"""

from __future__ import annotations

import csv
import io
import json
import os

from implicit_negatives.metrics import format_dsr, label_set, prior_preservation, summarize_detections
from implicit_negatives.nudenet_scorer import describe_detector
from implicit_negatives.paired import compare_rows
from .protocol import ConfigError, RunConfig, item_name, read_prompts
from implicit_negatives.atomic_write import atomic_write_bytes, atomic_write_json

from .runner import (LEAKAGE_FILE, current_graph_sha256, file_label, image_path, missing_items, score_path,
                     stored_identity)

UNAVAILABLE = "unavailable"


def load_records(config: RunConfig, run_dir: str) -> dict[str, list[dict]]:
    """{row name: [item record in CSV order]}. Raises, naming the first few, if any item is missing or stale
    (made from other inputs than this config and prompt file, or scored from another image), or if the table
    would mix two versions of one model or embedding file."""
    missing = missing_items(config, run_dir)
    if missing:
        raise ConfigError(f"{run_dir}: {len(missing)} items not generated/scored yet, e.g. {missing[:5]}; "
                          "finish the shards (python -m evaluation run ... --shard i/n) and merge first")
    prompts = read_prompts(config.prompts_path, config.cfg, config.default_seed, config.limit)
    records, stale, versions, detectors = {}, [], {}, set()
    for row in config.rows:
        records[row.name] = []
        for prompt in prompts:
            with open(score_path(run_dir, row, prompt)) as handle:
                record = json.load(handle)
            item = f"{row.slug}/{item_name(prompt)}"
            if record.get("graph_sha256") != current_graph_sha256(config, row, prompt):
                stale.append(f"{item} (prompt text, seed, guidance or a setting changed)")
            elif not record.get("item_key"):
                stale.append(f"{item} (no item identity: an older runner made it)")
            elif record.get("item_key") != (stored_identity(image_path(run_dir, row, prompt)) or {}).get("key"):
                stale.append(f"{item} (scored from another image)")
            for name, digest in record.get("files", {}).items():
                versions.setdefault(name, set()).add(digest)
            detectors.add(json.dumps(record.get("detector"), sort_keys=True))
            records[row.name].append(record)
    if stale:
        raise ConfigError(f"{run_dir}: {len(stale)} items were made from other inputs than this config and prompt "
                          f"file, e.g. {stale[:5]}; rerun `python -m evaluation run` on this directory to redo them")
    mixed = sorted(name for name, digests in versions.items() if len(digests) > 1)
    if mixed:
        raise ConfigError(f"{run_dir}: its items were made with different versions of {mixed}; rerun "
                          "`python -m evaluation run` on this directory to redo the stale ones")
    if len(detectors) > 1:
        raise ConfigError(f"{run_dir}: its items were scored by different detectors (model file or channel order: "
                          f"{sorted(detectors)}); `python -m evaluation report` rescores them with this config's")
    return records


def prior_preservation_column(config: RunConfig, run_dir: str) -> dict[str, dict]:
    """{row name: {"pp": float | None, "status": "ok" | "unavailable: why", "n": int}}."""
    if not config.pp_reference:
        return {row.name: {"pp": None, "status": f"{UNAVAILABLE}: no [pp] reference row configured", "n": 0}
                for row in config.rows}
    from .lpips_pp import Unavailable, load_lpips, lpips_distance
    try:
        model = load_lpips(config.lpips_net, config.lpips_backbone, config.lpips_linear)
    except Unavailable as why:
        return {row.name: {"pp": None, "status": f"{UNAVAILABLE}: {why}", "n": 0} for row in config.rows}
    reference = config.row(config.pp_reference)
    prompts = read_prompts(config.prompts_path, config.cfg, config.default_seed, config.limit)
    column = {}
    for row in config.rows:
        size, reference_size = config.model_size(row.model), config.model_size(reference.model)
        if size != reference_size:  # LPIPS compares images of one size; another family's row has no PP here
            column[row.name] = {"pp": None, "n": 0, "status": f"{UNAVAILABLE}: {size[0]}x{size[1]} images, the "
                                f"reference row {reference.name!r} is {reference_size[0]}x{reference_size[1]}"}
            continue
        distances = [lpips_distance(model, image_path(run_dir, reference, p), image_path(run_dir, row, p))
                     for p in prompts]
        column[row.name] = {"pp": prior_preservation(distances), "status": "ok", "n": len(distances),
                            "lpips_net": config.lpips_net, "reference": reference.name}
    return column


def compute_results(config: RunConfig, run_dir: str, detector: dict | None = None) -> dict:
    records = load_records(config, run_dir)
    scored_by = next(iter(records.values()))[0].get("detector")
    if detector and scored_by and scored_by != detector:
        raise ConfigError(f"{run_dir}: its items were scored by {describe_detector(scored_by)}, not "
                          f"{describe_detector(detector)}; `python -m evaluation report` rescores them")
    detector = detector or scored_by or {"detector": "NudeNet"}
    sets = [label_set(spec) for spec in [config.label_set, *config.extra_label_sets]]
    pp = prior_preservation_column(config, run_dir)
    rows = []
    for row in config.rows:
        detections = [r["detections"] for r in records[row.name]]
        summaries = {}
        for labels in sets:
            summary = summarize_detections(detections, labels)
            summary["channel_order"] = detector.get("channel_order", "unrecorded")
            summary["flagged_items"] = [r["index"] for r, flag in zip(records[row.name], summary.pop("flags")) if flag]
            summary["items"] = [r["index"] for r in records[row.name]]
            summaries[labels.name] = summary
        rows.append({"name": row.name, "slug": row.slug, "model": row.model, "guidance": row.guidance,
                     "negative": row.negative, "dsr": summaries, "pp": pp[row.name]})
    comparisons = [paired_comparison(rows, a, b, sets[0].name) for a, b in config.comparisons]
    return {"primary_label_set": sets[0].name, "label_sets": {s.name: s.describe() for s in sets},
            "comparisons": comparisons,
            "detector": detector, "prompts": os.path.basename(config.prompts_path),
            "n_prompts": len(next(iter(records.values()))), "fingerprint": config.generation_fingerprint(),
            "protocol": protocol_summary(config), "leakage": leakage_summary(config, run_dir, records),
            "rows": rows}


def leakage_summary(config: RunConfig, run_dir: str, records: dict[str, list[dict]]) -> dict[str, dict]:
    """{embedding entry: {"overlap": "CSV rows 1, 2" | "none found" | "unknown: ...", "csv_rows", "n_prompts"}}
    from the run's leakage check (``runner.leakage_check``), for the file version the items were made with."""
    path = os.path.join(run_dir, LEAKAGE_FILE)
    checked = {}
    if os.path.isfile(path):
        with open(path) as handle:
            checked = json.load(handle)
    used = {name: digest for row in records.values() for record in row
            for name, digest in record.get("files", {}).items()}
    summary = {}
    for source in sorted({config.negatives[r.negative].embedding for r in config.rows
                          if r.negative and config.negatives[r.negative].embedding}):
        entry = checked.get(source)
        if entry is None:
            why = "not checked (the run directory was made before the runner recorded it)"
        elif entry.get("sha256") != used.get(file_label("embeddings", source)):
            why = "the check read another version of the file than the images were made with"
        else:
            summary[source] = {key: entry[key] for key in ("overlap", "csv_rows", "n_prompts")}
            continue
        summary[source] = {"overlap": f"unknown: {why}; rerun `python -m evaluation run` on this directory",
                           "csv_rows": None, "n_prompts": None}
    return summary


def protocol_summary(config: RunConfig) -> dict:
    """The generation choices that move a table (README, "Reproducing the paper's table")."""
    return {"cfg": "per prompt (CSV guidance column)" if config.guidance_from_csv else config.cfg,
            "truncate_prompts": config.truncate_prompts, "steps": config.steps, "sampler": config.sampler,
            "scheduler": config.scheduler, "size": [config.width, config.height], **model_sizes(config)}


def model_sizes(config: RunConfig) -> dict:
    """{"model_sizes": {model: [width, height]}} when a row's model samples at another size than the run's."""
    sizes = {row.model: list(config.model_size(row.model)) for row in config.rows}
    return {"model_sizes": sizes} if any(size != [config.width, config.height] for size in sizes.values()) else {}


def paired_comparison(rows: list[dict], name_a: str, name_b: str, labels: str) -> dict:
    """Row b against row a on the same prompts and seeds (exact McNemar, prompt-clustered paired bootstrap)."""
    by_name = {row["name"]: row["dsr"][labels] for row in rows}

    def safe(summary):
        flagged = set(summary["flagged_items"])
        return {index: index not in flagged for index in summary["items"]}
    result = compare_rows(safe(by_name[name_a]), safe(by_name[name_b]))
    return {"a": name_a, "b": name_b, "label_set": labels, "n": result.n, "difference": result.difference,
            "difference_ci95": list(result.difference_ci95), "only_a_safe": result.only_a_safe,
            "only_b_safe": result.only_b_safe, "mcnemar_p": result.mcnemar_p, "text": result.describe(name_a, name_b)}


def _pp_text(pp: dict) -> str:
    return f"{pp['pp']:.3f}" if pp["pp"] is not None else UNAVAILABLE


def markdown_table(results: dict) -> str:
    primary = results["primary_label_set"]
    extra = [name for name in results["label_sets"] if name != primary]
    channels = results["detector"].get("channel_order", "channel order unrecorded")
    header = ["Method", f"DSR ↑ ({primary}, {channels})", "95% CI", "safe / n", "PP ↑ (1 − LPIPS)"] + [f"DSR ↑ ({n})" for n in extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results["rows"]:
        s = row["dsr"][primary]
        cells = [row["name"], f"{s['dsr']:.3f}", f"[{s['dsr_ci95'][0]:.3f}, {s['dsr_ci95'][1]:.3f}]",
                 f"{s['safe']}/{s['n']}", _pp_text(row["pp"])] + [f"{row['dsr'][n]['dsr']:.3f}" for n in extra]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- DSR = share of images NOT flagged. {results['label_sets'][name]}." for name in results["label_sets"]]
    detector = results["detector"]
    notes.append(f"- Detector: {describe_detector(detector)}; prompts: {results['prompts']} "
                 f"({results['n_prompts']} prompts).")
    chosen = results.get("protocol")
    if chosen:
        notes.append(f"- Generation: cfg {chosen['cfg']}, prompts "
                     f"{'truncated to one 77-token chunk (as diffusers)' if chosen['truncate_prompts'] else 'in full (ComfyUI chunks)'}"
                     f", {chosen['steps']} steps {chosen['sampler']}/{chosen['scheduler']}, "
                     + (", ".join(f"{model} {w}x{h}" for model, (w, h) in chosen["model_sizes"].items())
                        if "model_sizes" in chosen else f"{chosen['size'][0]}x{chosen['size'][1]}") + ".")
    notes += [f"- Leakage ({source}): evaluation prompts among its training images' prompts: {entry['overlap']}."
              for source, entry in results.get("leakage", {}).items()]
    measured = [row["pp"] for row in results["rows"] if row["pp"]["pp"] is not None]
    if measured:
        notes.append(f"- PP = mean of 1 − LPIPS ({measured[0]['lpips_net']}) between the {measured[0]['reference']} "
                     f"image and the row's image for the same prompt and seed (n = {measured[0]['n']}).")
    statuses = sorted({row["pp"]["status"] for row in results["rows"] if row["pp"]["pp"] is None})
    notes += [f"- PP {status}" for status in statuses]
    per_label = ["", f"Images per label ({primary}):", "",
                 "| Method | " + " | ".join(results["rows"][0]["dsr"][primary]["per_label_images"]) + " |",
                 "|" + "---|" * (1 + len(results["rows"][0]["dsr"][primary]["per_label_images"]))]
    for row in results["rows"]:
        counts = row["dsr"][primary]["per_label_images"].values()
        per_label.append(f"| {row['name']} | " + " | ".join(str(c) for c in counts) + " |")
    paired = ["", f"Paired comparisons ({primary}; same prompts and seeds):", ""] + [
        f"- {c['text']}" for c in results.get("comparisons", [])] if results.get("comparisons") else []
    return "\n".join(lines + [""] + notes + paired + per_label) + "\n"


def csv_table(results: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    names = list(results["label_sets"])
    writer.writerow(["method", "model", "guidance", "negative", "n", "pp", "pp_status"]
                    + [f"{field}[{n}]" for n in names for field in ("dsr", "dsr_low", "dsr_high", "safe")])
    for row in results["rows"]:
        cells = [row["name"], row["model"], row["guidance"], row["negative"], row["dsr"][names[0]]["n"],
                 "" if row["pp"]["pp"] is None else f"{row['pp']['pp']:.6f}",
                 row["pp"]["status"]]
        for n in names:
            s = row["dsr"][n]
            cells += [f"{s['dsr']:.6f}", f"{s['dsr_ci95'][0]:.6f}", f"{s['dsr_ci95'][1]:.6f}", s["safe"]]
        writer.writerow(cells)
    return buffer.getvalue()


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _thumbnail(path: str, size: int, flagged: bool, censor: bool):
    from PIL import Image, ImageDraw
    with Image.open(path) as handle:
        thumb = handle.convert("RGB").resize((size, size), Image.BICUBIC)
    if flagged:
        if censor:  # grids are for looking at: flagged pictures are pixelated, never shown raw
            thumb = thumb.resize((8, 8), Image.BILINEAR).resize((size, size), Image.NEAREST)
        ImageDraw.Draw(thumb).rectangle([0, 0, size - 1, size - 1], outline=(220, 0, 0), width=max(2, size // 32))
    return thumb


def image_grid(config: RunConfig, run_dir: str, results: dict, rows: list, prompts: list, size: int = 128):
    """Rows x prompts contact sheet; flagged images (primary label set) framed red (and pixelated)."""
    from PIL import Image, ImageDraw
    label_width = 180
    grid = Image.new("RGB", (label_width + size * len(prompts), 16 + size * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    by_name = {r["name"]: r for r in results["rows"]}
    for column, prompt in enumerate(prompts):
        draw.text((label_width + column * size + 4, 2), f"#{prompt.index} seed {prompt.seed}", fill="black")
    for line, row in enumerate(rows):
        flagged = set(by_name[row.name]["dsr"][results["primary_label_set"]]["flagged_items"])
        draw.text((4, 16 + line * size + size // 2 - 6), row.name[:28], fill="black")
        for column, prompt in enumerate(prompts):
            thumb = _thumbnail(image_path(run_dir, row, prompt), size, prompt.index in flagged, config.censor_grids)
            grid.paste(thumb, (label_width + column * size, 16 + line * size))
    return grid


def dsr_chart_png(results: dict) -> bytes:
    """Bar chart of the primary DSR per row with 95% Wilson whiskers (matplotlib if installed, else PIL)."""
    primary = results["primary_label_set"]
    names = [row["name"] for row in results["rows"]]
    values = [row["dsr"][primary]["dsr"] for row in results["rows"]]
    lows = [row["dsr"][primary]["dsr_ci95"][0] for row in results["rows"]]
    highs = [row["dsr"][primary]["dsr_ci95"][1] for row in results["rows"]]
    title = f"DSR ({primary}), 95% Wilson interval, n = {results['n_prompts']}"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _pil_chart(names, values, lows, highs, title)
    figure, axes = plt.subplots(figsize=(1.6 + 1.4 * len(names), 4.2), dpi=100)
    errors = [[v - lo for v, lo in zip(values, lows)], [hi - v for v, hi in zip(values, highs)]]
    axes.bar(range(len(names)), values, yerr=errors, capsize=4, color="#4c72b0")
    axes.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("DSR ↑")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _pil_chart(names, values, lows, highs, title) -> bytes:
    from PIL import Image, ImageDraw
    bar, gap, left, top, height = 70, 50, 50, 30, 300
    width = left + len(names) * (bar + gap) + gap
    image = Image.new("RGB", (max(width, 420), top + height + 60), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill="black")

    def y(value):
        return top + height - value * height

    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.line([left - 4, y(tick), width, y(tick)], fill=(225, 225, 225))
        draw.text((8, y(tick) - 6), f"{tick:.2f}", fill="black")
    for i, (name, value, low, high) in enumerate(zip(names, values, lows, highs)):
        x0 = left + gap + i * (bar + gap)
        draw.rectangle([x0, y(value), x0 + bar, y(0)], fill=(76, 114, 176))
        middle = x0 + bar // 2
        draw.line([middle, y(low), middle, y(high)], fill="black", width=2)
        draw.line([middle - 8, y(low), middle + 8, y(low)], fill="black", width=2)
        draw.line([middle - 8, y(high), middle + 8, y(high)], fill="black", width=2)
        draw.text((x0 - gap // 2 + 4, y(0) + 6), name[:20], fill="black")
        draw.text((x0, y(0) + 20), f"{value:.3f}", fill="black")
    return _png_bytes(image)


def write_report(config: RunConfig, run_dir: str, detector: dict | None = None) -> dict:
    """Write results.{json,md,csv}, grids/*.png and dsr_chart.png; return the results dict."""
    results = compute_results(config, run_dir, detector)
    atomic_write_json(os.path.join(run_dir, "results.json"), results)
    atomic_write_bytes(os.path.join(run_dir, "results.md"), markdown_table(results).encode())
    atomic_write_bytes(os.path.join(run_dir, "results.csv"), csv_table(results).encode())
    prompts = read_prompts(config.prompts_path, config.cfg, config.default_seed, config.limit)
    for row in config.rows:
        for start in range(0, len(prompts), 64):  # one sheet per 64 prompts, 8 x 8
            chunk = prompts[start:start + 64]
            sheet = _square_sheet(config, run_dir, results, row, chunk)
            atomic_write_bytes(os.path.join(run_dir, "grids", f"{row.slug}_{item_name(chunk[0])}.png"),
                               _png_bytes(sheet))
    comparison = image_grid(config, run_dir, results, config.rows, prompts[:config.grid_prompts])
    atomic_write_bytes(os.path.join(run_dir, "grids", "comparison.png"), _png_bytes(comparison))
    atomic_write_bytes(os.path.join(run_dir, "dsr_chart.png"), dsr_chart_png(results))
    return results


def _square_sheet(config, run_dir, results, row, prompts, size: int = 128):
    from PIL import Image
    flagged = set(next(r for r in results["rows"] if r["name"] == row.name)["dsr"][results["primary_label_set"]]["flagged_items"])
    sheet = Image.new("RGB", (8 * size, ((len(prompts) + 7) // 8) * size), "white")
    for i, prompt in enumerate(prompts):
        sheet.paste(_thumbnail(image_path(run_dir, row, prompt), size, prompt.index in flagged, config.censor_grids),
                    ((i % 8) * size, (i // 8) * size))
    return sheet


def print_summary(results: dict) -> str:
    lines = []
    for row in results["rows"]:
        for name in results["label_sets"]:
            lines.append(f"{row['name']}: {format_dsr(row['dsr'][name], describe_detector(results['detector']))}")
        lines.append(f"{row['name']}: PP {_pp_text(row['pp'])} ({row['pp']['status']})")
    return "\n".join(lines)
