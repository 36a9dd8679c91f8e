"""A training run's work folder: who may use it, which run it holds, and what becomes of its progress.

The folder holds the resume state (``state.pt``), the embedding so far, the loss log, previews, cached
latents, and ``run.json``: the fingerprint of everything that defines the run (model files and strengths,
images and captions or the generation settings, caption templates, hyper-parameters). Rules:

* a rerun without ``--resume`` on a folder holding progress is refused: it would overwrite that progress;
* ``--resume`` is refused when the fingerprint differs: the result would describe a run nobody made;
* ``--restart`` discards the progress and starts over.

One process at a time uses a work folder, and one writes an output name (``run_lock``); what a killed run
left half-written (``*.partial``) is removed by the next one that holds the locks.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
from typing import Iterator, Optional

from implicit_negatives.atomic_write import PARTIAL_SUFFIX, atomic_write_json
from implicit_negatives.embedding_io import sha256_file
from implicit_negatives.inversion import load_state
from implicit_negatives.run_lock import run_lock

RUN_RECORD = "run.json"
STATE_FILE = "state.pt"
PROGRESS_FILES = (STATE_FILE, "checkpoint.safetensors", "loss.csv", "loss.png")


def default_work_dir(training_root: str, destination: str) -> str:
    """``<training_root>/<output stem>-<8 hex of its full path>``: one folder per output file, so runs that
    write different files (also same-named ones in different folders) never share a work folder."""
    stem = os.path.splitext(os.path.basename(destination))[0]
    digest = hashlib.sha256(os.path.realpath(destination).encode()).hexdigest()[:8]
    return os.path.join(training_root, f"{stem}-{digest}")


@contextlib.contextmanager
def claimed(work_dir: str, destination: str) -> Iterator[None]:
    """Hold the output name's and the work folder's locks; clear what a killed run left half-written."""
    output_lock = os.path.join(os.path.dirname(destination), f".{os.path.basename(destination)}.lock")
    with run_lock(output_lock, f"output {destination}") as dead_output, \
            run_lock(os.path.join(work_dir, "run.lock"), f"work folder {work_dir}") as dead_work:
        for what, dead in ((destination, dead_output), (work_dir, dead_work)):
            if dead:
                print(f"[lock] {what}: took over the lock of a run that is no longer running ({dead})")
        # Temporary names start with "." (hidden), which glob skips: walk the folders instead.
        partials = [os.path.join(folder, name) for folder, _, names in os.walk(work_dir) for name in names
                    if name.endswith(PARTIAL_SUFFIX)]
        out_dir, mine = os.path.dirname(destination), f".{os.path.basename(destination)}."
        partials += [os.path.join(out_dir, name) for name in os.listdir(out_dir)
                     if name.startswith(mine) and name.endswith(PARTIAL_SUFFIX)]
        for path in partials:
            os.remove(path)
        if partials:
            print(f"[cleanup] removed {len(partials)} half-written file(s) a killed run left")
        yield


def sha256_path(path: str) -> str:
    """sha256 of a file, or of a folder's files (names and contents; e.g. a transformers text encoder)."""
    if os.path.isfile(path):
        return sha256_file(path)
    digest = hashlib.sha256()
    for folder, _, names in sorted(os.walk(path)):
        for name in sorted(names):
            full = os.path.join(folder, name)
            digest.update(f"{os.path.relpath(full, path)}:{sha256_file(full)}\n".encode())
    return digest.hexdigest()


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def open_run(work_dir: str, inputs: dict, resume: bool, restart: bool) -> Optional[dict]:
    """Check this run against the work folder and record it there; return the state to resume from, or None.

    inputs: what defines the run (JSON values by name); a changed entry is named in the refusal.
    Raises SystemExit with the way out when the folder holds progress this run must not overwrite or join.
    """
    if resume and restart:
        raise SystemExit("error: --resume continues the run in the work folder, --restart discards it: give one")
    record_path, state_path = os.path.join(work_dir, RUN_RECORD), os.path.join(work_dir, STATE_FILE)
    has_state = os.path.isfile(state_path)
    recorded = None
    if os.path.isfile(record_path):
        with open(record_path, encoding="utf-8") as handle:
            recorded = json.load(handle)
    if restart:
        for path in [os.path.join(work_dir, n) for n in PROGRESS_FILES] + glob.glob(
                os.path.join(glob.escape(work_dir), "preview-*.png")):
            if os.path.exists(path):
                os.remove(path)
        if has_state:
            print(f"[restart] discarded the progress in {work_dir}")
        has_state = False
    elif resume:
        if recorded is None:
            raise SystemExit(f"error: --resume, but {work_dir} holds no run record ({RUN_RECORD}), so nothing this "
                             "run could continue; run without --resume (or with --restart) to start over")
        old = recorded.get("inputs", {})
        changed = sorted(k for k in set(old) | set(inputs) if old.get(k) != inputs.get(k))
        if changed:
            raise SystemExit(f"error: cannot --resume: {work_dir} holds a run with other {', '.join(changed)}. "
                             "Resume it with its own command, pass --restart to discard it and train this run, "
                             "or give this run another --work-dir")
    elif has_state:
        state = load_state(state_path)
        raise SystemExit(f"error: {work_dir} holds a run at step {state['step']} of {state['config']['steps']}: "
                         "rerun with --resume to continue it, or with --restart to discard it and start over "
                         "(or give this run another --work-dir)")
    atomic_write_json(record_path, {"fingerprint": fingerprint(inputs), "inputs": inputs})
    if not resume:
        return None
    if not has_state:
        print(f"[resume] {work_dir} holds this run but no checkpoint yet: starting at step 0")
        return None
    state = load_state(state_path)
    print(f"[resume] from step {state['step']} of {state_path}")
    return state
