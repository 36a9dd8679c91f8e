"""The paper in miniature: does text-negative guidance fail on an unlearned model while an implicit
negative (learned by concept inversion) succeeds? Tested end to end in a synthetic 16-px world.

    python -m bench.paper_in_miniature                 # full run, writes bench/out/
    python -m bench.paper_in_miniature --smoke --out /tmp/x   # seconds; numbers meaningless
    python -m bench.paper_in_miniature --sweep --out /tmp/s   # ESD strengths, one seed (sweep.md)
    python -m bench.paper_in_miniature --design 2      # design 2 (bench/toy_world/PREREGISTRATION.md)
    python -m bench.paper_in_miniature --design 2 --tune '[{"esd_learning_rate": 1e-3}]'  # validity only

Trains the world model and detector (cached under --cache, keyed by their configs), erases the
concept with ESD, learns C* with `implicit_negatives.inversion.invert_concept`, samples with
`implicit_negatives.cfg.cfg_noise` / `implicit_negatives.sld.sld_noise`, and writes report.md,
results.json, bar_chart.png, grid_overview.png, grids/ and grid_images.safetensors (for --report-only)
into --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from bench.toy_world.experiment import SMOKE, BenchConfig, load_or_train_detector, load_or_train_world, run
from bench.toy_world.report import claim_word, rewrite_report, write_report

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.paper_in_miniature", description=__doc__.split("\n\n")[0])
    parser.add_argument("--design", type=int, choices=(1, 2), default=1,
                        help="1: the first world (ESD-u / ESD-x); 2: the pre-registered second design (UCE / ESD-x+p)")
    parser.add_argument("--tune", default=None, metavar="JSON",
                        help="design 2 only: a JSON list of unlearning settings (Design2Config overrides); samples only "
                             "the validity metrics on seed 0 and writes tuning.json to --out")
    parser.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                        help="design 2 only: one report in --out from runs of disjoint --seeds written to these folders")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for the report (default bench/out/)")
    parser.add_argument("--smoke", action="store_true", help="tiny budgets: checks the pipeline, not the claim")
    parser.add_argument("--cache", default=None,
                        help="folder for the trained world model and detector (default <out>/cache); "
                             "'none' retrains every time")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the seeds (default 0 1 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="design 2: run the seeds in this many worker processes at once, one seed and one thread "
                             "each (default 2, one per core); the world model is trained first, here, at --threads. "
                             "Per-seed numbers do not depend on --jobs. 1: every seed in this process at --threads "
                             "(other thread counts than 1 round ESD-x+p's fine-tuning and the inversion differently, "
                             "and so change the numbers)")
    parser.add_argument("--train-only", action="store_true",
                        help="train (or find) the world model and detector in --cache, then stop")
    parser.add_argument("--train-device", default="cpu",
                        help="device for training the world model, e.g. cuda (everything else runs on the CPU)")
    parser.add_argument("--sweep", action="store_true",
                        help="instead of the benchmark: DSR and PP at several ESD strengths (one seed), sweep.md in --out")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report in --out from its results.json (after changing the report code)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = _config(args)
    cache = None if args.cache == "none" else (args.cache or os.path.join(args.out, "cache"))
    start = time.time()

    def log(message: str) -> None:
        print(f"[{time.time() - start:6.0f} s] {message}", flush=True)

    if args.train_only:
        if cache is None:
            parser.error("--train-only needs a cache folder")
        load_or_train_world(cfg, cache, log=log, device=args.train_device)
        load_or_train_detector(cfg, cache)
        print(f"world model and detector in {cache} ({time.time() - start:.0f} s)")
        return 0
    if args.design == 2:
        return _design2(args, parser, cfg, cache, start, log)
    if args.sweep:
        from bench.toy_world.sweep import run_sweep, write_sweep
        sweep = run_sweep(cfg, cache, seed=(args.seeds or [0])[0], log=log)
        print(f"wrote {write_sweep(sweep, args.out)} in {time.time() - start:.0f} s")
        return 0
    if args.report_only:
        doc = rewrite_report(args.out)
    else:
        results = run(cfg, cache=cache, log=log)
        doc = write_report(results, args.out, smoke=args.smoke)
    v = doc["verdict"]
    print(f"\nwrote {os.path.join(args.out, 'report.md')} in {time.time() - start:.0f} s")
    if not v["valid"]:
        print(f"verdict: INCONCLUSIVE ({v['validity']})")
    for variant in ("ESD-U", "ESD-X"):
        print(f"{variant}: claim 1 (text negatives add little) {claim_word(v, variant, 'claim1_text_negatives_add_little')}; "
              f"claim 2 (implicit: large gain, modest PP cost) {claim_word(v, variant, 'claim2_implicit_large_gain_modest_cost')}")
    return 0


def _config(args):
    """The design's configuration (smoke budgets with --smoke), with --seeds applied."""
    from dataclasses import replace

    if args.design == 2:
        from bench.toy_world import design2
        cfg = design2.SMOKE2 if args.smoke else design2.Design2Config()
    else:
        cfg = SMOKE if args.smoke else BenchConfig()
    return replace(cfg, seeds=tuple(args.seeds)) if args.seeds else cfg


def _design2(args, parser, cfg, cache, start, log) -> int:
    import json

    from bench.toy_world import design2, report2

    if args.sweep or args.report_only:
        parser.error("--sweep and --report-only are design 1 options")
    if args.tune:
        rows = design2.tune(cfg, cache, json.loads(args.tune), log=log)
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "tuning.json")
        previous = json.load(open(path)) if os.path.exists(path) else []
        with open(path, "w") as f:
            json.dump(previous + rows, f, indent=1)
        with open(os.path.join(args.out, "tuning.md"), "w") as f:
            f.write(design2.tuning_markdown(previous + rows))
        print(f"appended {len(rows)} rows to {path} (and tuning.md)")
        return 0
    if args.merge:
        doc = report2.merge_reports(args.merge, args.out)
    elif args.jobs > 1 and len(cfg.seeds) > 1 and cache is not None:
        t = time.time()
        _, cached = load_or_train_world(cfg, cache, log=log, device=args.train_device)  # once, for every worker
        world_s = time.time() - t
        load_or_train_detector(cfg, cache)
        folders = _seeds_in_workers(args, cfg.seeds, cache, log)
        doc = report2.merge_reports(folders, args.out, {"world_s": world_s, "total_s": time.time() - start}, cached)
    else:
        doc = report2.write_report(design2.run(cfg, cache=cache, log=log), args.out, smoke=args.smoke)
    print(f"\nwrote {os.path.join(args.out, 'report.md')} in {time.time() - start:.0f} s")
    for v in design2.VARIANTS:
        d = doc["verdict"][v]
        print(f"{v}: preconditions {'held' if d['valid'] else 'MISSED'}; claim 1 {d['claim1']}; "
              f"claim 2 (SLD) {d['claim2_sld']}; claim 2 (NP) {d['claim2_np']}")
    print(doc["verdict"]["statement"])
    return 0


def _seeds_in_workers(args, seeds, cache: str, log) -> list[str]:
    """Each seed in its own process (this command with `--seeds S --threads 1 --jobs 1`), at most --jobs at once,
    into <out>/seeds/S (its log: run.log there); the folders, in seed order, for `report2.merge_reports`."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    command = [sys.executable, "-m", "bench.paper_in_miniature", "--design", "2", "--threads", "1", "--jobs", "1",
               "--cache", cache] + (["--smoke"] if args.smoke else [])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run_seed(seed: int) -> str:
        folder = os.path.join(args.out, "seeds", str(seed))
        os.makedirs(folder, exist_ok=True)
        log_path = os.path.join(folder, "run.log")
        with open(log_path, "w") as out:
            code = subprocess.run(command + ["--seeds", str(seed), "--out", folder], stdout=out,
                                  stderr=subprocess.STDOUT, cwd=root).returncode
        if code:
            raise RuntimeError(f"seed {seed}'s worker failed (exit {code}); its log: {log_path}")
        log(f"seed {seed} done ({folder})")
        return folder

    log(f"seeds {list(seeds)} in {min(args.jobs, len(seeds))} worker processes (logs in {args.out}/seeds/)")
    with ThreadPoolExecutor(args.jobs) as pool:
        return list(pool.map(run_seed, seeds))


if __name__ == "__main__":
    sys.exit(main())
