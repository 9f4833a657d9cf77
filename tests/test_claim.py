"""Run-folder claims: one owner per folder, atomic, re-entrant, stale-claim recovery; two real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from medkd.claim import Claim, ClaimedError, claimed_by_other, lock_path, read_owner


def _fake_owner(lock: Path, pid: int, host: str = None, start: str = None, age_s: float = 0.0) -> dict:
    doc = {"pid": pid, "host": host or socket.gethostname(), "start": start, "since": "then", "token": "x"}
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps(doc))
    if age_s:
        t = time.time() - age_s
        os.utime(lock, (t, t))
    return doc


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_claim_is_exclusive_reentrant_and_released(tmp_path):
    run = tmp_path / "run"
    with Claim(run) as c:
        owner = read_owner(lock_path(run))
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with Claim(run):  # the same process may nest (ablate holds it, distill claims again)
            pass
        assert lock_path(run).is_file() and c.depth == 1
        assert claimed_by_other(run) is None  # ours
    assert not lock_path(run).exists()


def test_live_owner_is_named_and_nothing_is_touched(tmp_path):
    run = tmp_path / "run"
    _fake_owner(lock_path(run), os.getppid())  # a live process on this host
    with pytest.raises(ClaimedError, match=rf"run: run folder is in use by pid {os.getppid()}@"):
        Claim(run).acquire()
    assert read_owner(lock_path(run))["pid"] == os.getppid()  # not removed
    assert claimed_by_other(run)["pid"] == os.getppid()


@pytest.mark.parametrize("case", ["dead-pid", "reused-pid", "other-host-expired", "malformed-old"])
def test_stale_claims_are_taken_over(tmp_path, case):
    run = tmp_path / "run"
    lock = lock_path(run)
    if case == "dead-pid":
        _fake_owner(lock, _dead_pid())
    elif case == "reused-pid":  # the pid runs, but it is another process than the one that claimed
        _fake_owner(lock, os.getppid(), start="1")
    elif case == "other-host-expired":
        _fake_owner(lock, 1, host="some-other-node", age_s=3600)
    else:
        lock.write_text("{not json")
        t = time.time() - 120
        os.utime(lock, (t, t))
    assert claimed_by_other(run) is None
    with Claim(run):
        assert read_owner(lock)["pid"] == os.getpid()
    assert not lock.exists()


def test_other_host_with_fresh_heartbeat_is_live(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _fake_owner(lock_path(run), 1, host="some-other-node", age_s=5)
    with pytest.raises(ClaimedError, match="pid 1@some-other-node"):
        Claim(run).acquire()
    monkeypatch.setenv("MEDKD_CLAIM_TIMEOUT", "1")  # a shorter timeout expires it
    with Claim(run):
        pass


def test_racing_threads_on_a_stale_claim_one_winner(tmp_path):
    """Many claimers on one stale claim: exactly one wins (the takeover is guarded)."""
    run = tmp_path / "run"
    _fake_owner(lock_path(run), _dead_pid())
    wins, errors = [], []
    barrier = threading.Barrier(6)

    def worker(i):  # one "process" each: its own claim document, no shared in-process table
        c = Claim(run)
        doc = {**c._new_doc(), "token": f"t{i}"}
        barrier.wait()
        try:
            c._claim_file(doc)
            wins.append(i)
        except ClaimedError:
            errors.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1, (wins, errors)
    assert read_owner(lock_path(run))["token"] == f"t{wins[0]}" and len(errors) == 5


def test_two_real_processes_same_run_folder(tiny_data, tiny_teacher, tmp_path):
    """Two `medkd distill` to one -o started together: one finishes (exit 0), the other exits 1 at once naming it."""
    run = tmp_path / "student"
    cmd = [sys.executable, "-m", "medkd", "distill", str(tiny_data), "-o", str(run), "--teacher", str(tiny_teacher),
           "--student-width", "4", "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--scales", "dec",
           "--loss", "mse", "--no-pmd", "--teacher-outputs", "live", "-q"]  # no cache: the shared teacher stays cold
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([*cmd, "--seed", str(s)], stderr=subprocess.PIPE, text=True, env=env) for s in (0, 1)]
    outs = [p.communicate(timeout=240)[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], outs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    lines = [ln for ln in outs[loser].splitlines() if ln.strip()]
    assert len(lines) == 1 and "run folder is in use by" in lines[0], outs[loser]
    assert f"pid {procs[winner].pid}@{socket.gethostname()}" in lines[0]
    # the folder is the winner's alone
    summary = json.loads((run / "summary.json").read_text())
    assert summary["seed"] == winner and summary["epochs_done"] == 2
    assert f"seed: {winner}" in (run / "config.yaml").read_text()
    assert not lock_path(run).exists()
