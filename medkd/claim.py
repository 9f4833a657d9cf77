"""Claims: one process owns a run folder (or any path) at a time, across processes, shards and hosts.

A claim is the file ``PATH.lock`` beside the claimed path, holding ``{"pid", "host", "start", "since", "token",
"command"}``. It is created atomically: the content is written to a private temp file which is then hard-linked to
``PATH.lock`` (``os.link`` fails when the name exists, on local file systems and NFS alike), so nobody ever sees a
half-written claim and exactly one of several racing processes wins. While held, a daemon thread touches the file
every :data:`HEARTBEAT_S` seconds.

A claim is **stale** (its owner is gone) when

* its host is this host and no process with its pid and start time runs (a reused pid does not count as alive), or
* its heartbeat is older than ``MEDKD_CLAIM_TIMEOUT`` seconds (default :data:`DEFAULT_TIMEOUT_S`), which is how a
  claim left by a killed job on another cluster node expires.

A stale claim is taken over under a short-lived ``PATH.lock.takeover`` claim, so two processes that find the same
stale claim cannot both take it. Claims are re-entrant within one process (``distill`` claims its run folder, and
``ablate`` may already hold it).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Optional

from medkd.errors import MedkdError

HEARTBEAT_S = 30.0
DEFAULT_TIMEOUT_S = 600.0
TAKEOVER_STALE_S = 30.0

_held: Dict[str, "Claim"] = {}  # lock path -> the claim this process holds
_held_lock = threading.Lock()


class ClaimedError(MedkdError):
    """The path is claimed by another live process (``owner`` is its claim document)."""

    def __init__(self, message: str, owner: Dict[str, Any]):
        super().__init__(message)
        self.owner = owner


def lock_path(path: Path) -> Path:
    """``RUN`` -> ``RUN.lock`` (beside it, so it survives ``RUN.partial`` being moved into place)."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def _proc_start(pid: int) -> Optional[str]:
    """Start time of a process on this host (Linux ``/proc/<pid>/stat`` field 22), ``None`` where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def pid_alive(pid: int, start: Optional[str] = None) -> bool:
    """Whether process ``pid`` runs on this host (and, given its recorded ``start`` time, is still that process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    if start is not None:
        now = _proc_start(pid)
        if now is not None and now != start:  # the pid was reused by another process
            return False
    return True


def timeout_s() -> float:
    try:
        return float(os.environ.get("MEDKD_CLAIM_TIMEOUT", DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def read_owner(lock: Path) -> Optional[Dict[str, Any]]:
    """The claim document in ``lock`` (``{}`` when unreadable or malformed, ``None`` when there is none)."""
    try:
        text = Path(lock).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        doc = json.loads(text)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def is_stale(lock: Path, owner: Dict[str, Any]) -> bool:
    """Whether the claim's owner is gone (see the module docstring)."""
    try:
        age = time.time() - Path(lock).stat().st_mtime
    except FileNotFoundError:
        return True
    if age > timeout_s():
        return True
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        return not pid_alive(owner["pid"], owner.get("start"))
    return not owner and age > TAKEOVER_STALE_S  # unreadable/malformed: stale once it is not being written


def describe(owner: Dict[str, Any]) -> str:
    """``pid 123@node7 since 2026-01-01 10:00:00 UTC``."""
    return f"pid {owner.get('pid', '?')}@{owner.get('host', '?')} since {owner.get('since', '?')}"


def _link_new(lock: Path, doc: Dict[str, Any]) -> bool:
    """Create ``lock`` with ``doc`` atomically; False when it already exists."""
    tmp = lock.with_name(f".{lock.name}.{doc['token']}")
    tmp.write_text(json.dumps(doc))
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


class Claim:
    """Own ``path`` (``with Claim(run): ...``, or :meth:`acquire` / :meth:`release`).

    Args:
        path: the claimed path (a run folder; it need not exist).
        what: how the path is named in the error (``"run folder"``).

    Raises:
        ClaimedError: (from :meth:`acquire`) another live process holds the claim; the message names it.
    """

    def __init__(self, path: Path, what: str = "run folder"):
        self.path = Path(path)
        self.lock = lock_path(self.path)
        self.what = what
        self.depth = 0
        self.doc: Dict[str, Any] = {}
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None

    def _new_doc(self) -> Dict[str, Any]:
        pid = os.getpid()
        return {"pid": pid, "host": socket.gethostname(), "start": _proc_start(pid),
                "since": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "token": uuid.uuid4().hex,
                "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}

    def acquire(self) -> "Claim":
        key = str(self.lock.resolve())
        with _held_lock:
            mine = _held.get(key)
            if mine is not None:  # re-entrant within this process
                mine.depth += 1
                return mine
        doc = self._new_doc()
        self._claim_file(doc)
        self.doc, self.depth = doc, 1
        with _held_lock:
            _held[key] = self
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"claim {self.lock.name}", daemon=True)
        self._beat.start()
        return self

    def _claim_file(self, doc: Dict[str, Any]) -> None:
        """Make ``doc`` the content of the lock file, taking over a stale claim; raise if a live one holds it."""
        self.lock.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(50):
            if _link_new(self.lock, doc):
                return
            owner = read_owner(self.lock)
            if owner is None:
                continue  # released in between: try again
            if not is_stale(self.lock, owner):
                raise ClaimedError(
                    f"{self.path}: {self.what} is in use by {describe(owner)} ({self.lock}; if that process is "
                    f"gone, delete the file)", owner)
            self._take_over(owner, doc)
            if read_owner(self.lock) == doc:
                return
        raise MedkdError(f"{self.path}: could not claim {self.lock} (it keeps changing)")

    def _take_over(self, stale: Dict[str, Any], doc: Dict[str, Any]) -> None:
        """Replace a stale claim by ours, under ``PATH.lock.takeover`` so only one process does it."""
        guard = self.lock.with_name(self.lock.name + ".takeover")
        if not _link_new(guard, {**doc, "token": doc["token"] + "-t"}):
            g = read_owner(guard)
            if g is not None and is_stale(guard, g if g else {}):
                guard.unlink(missing_ok=True)
            time.sleep(0.2)
            return
        try:
            if read_owner(self.lock) == stale:  # still the stale owner we judged
                self.lock.unlink(missing_ok=True)
                _link_new(self.lock, doc)
        finally:
            guard.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.lock)
            except OSError:
                pass

    def release(self) -> None:
        key = str(self.lock.resolve())
        with _held_lock:
            if _held.get(key) is not self:
                return
            self.depth -= 1
            if self.depth > 0:
                return
            del _held[key]
        self._stop.set()
        if read_owner(self.lock) == self.doc:  # never remove a claim that is not ours
            self.lock.unlink(missing_ok=True)

    def __enter__(self) -> "Claim":
        claim = self.acquire()
        self._entered = claim
        return claim

    def __exit__(self, *exc: Any) -> None:
        self._entered.release()


def claimed_by_other(path: Path) -> Optional[Dict[str, Any]]:
    """The live owner of ``path``'s claim when it is another process (``None`` when free, stale or ours)."""
    lock = lock_path(path)
    owner = read_owner(lock)
    if owner is None:
        return None
    with _held_lock:
        if str(lock.resolve()) in _held:
            return None
    return None if is_stale(lock, owner) else owner
