"""Run locks: a live holder (another process) refuses the lock; a SIGKILLed holder's lock is taken over, said so."""

import os
import signal
import subprocess
import sys

import pytest

from implicit_negatives.run_lock import RunLockedError, run_lock

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLDER = ("import sys; from implicit_negatives.run_lock import run_lock\n"
          "with run_lock(sys.argv[1], 'test'):\n"
          "    print('held', flush=True); sys.stdin.read()\n")


def hold_in_another_process(path):
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], cwd=REPO_ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_live_holder_refuses_and_a_killed_one_is_taken_over(tmp_path):
    path = tmp_path / "work" / "run.lock"
    holder = hold_in_another_process(path)
    try:
        with pytest.raises(RunLockedError, match=f"work folder X is in use by a running trainer \\(pid {holder.pid} "):
            with run_lock(str(path), "work folder X"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert path.exists()  # SIGKILL left the file (and its holder's name) behind, but no lock on it
    with run_lock(str(path), "work folder X") as dead:
        assert dead.startswith(f"pid {holder.pid} on ")
        assert f"pid {os.getpid()} on " in path.read_text()
    assert not path.exists()  # a clean release removes the file
    with run_lock(str(path), "work folder X") as dead:
        assert dead is None


def test_a_clean_holder_leaves_nothing_to_take_over(tmp_path):
    path = tmp_path / "run.lock"
    holder = hold_in_another_process(path)
    holder.communicate("")  # the holder leaves its block and exits normally
    assert holder.returncode == 0 and not path.exists()
    with run_lock(str(path), "output Y") as dead:
        assert dead is None


def test_the_next_run_clears_what_a_killed_run_half_wrote(tmp_path, capsys):
    from trainer.workdir import claimed
    work, out = tmp_path / "work", tmp_path / "embeddings"
    (work / "generated").mkdir(parents=True)
    out.mkdir()
    left = [work / ".state.pt.k2j1.partial", work / "generated" / ".generated_000_000.png.x9.partial",
            out / ".mine.safetensors.a1b2.partial"]
    kept = [out / ".other.safetensors.c3d4.partial", out / "mine.safetensors", work / "state.pt"]
    for path in left + kept:
        path.write_bytes(b"x")
    with claimed(str(work), str(out / "mine.safetensors")):
        assert [p for p in left if p.exists()] == [] and all(p.exists() for p in kept)  # another name's: not ours
    assert "removed 3 half-written file(s)" in capsys.readouterr().out
