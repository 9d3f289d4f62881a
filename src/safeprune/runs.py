"""Output folders that survive kills and never eat a user's files: a lock, a marker, a state machine.

Every command that writes a folder holds an exclusive lock while it writes (`lock`): a sibling file
`.<name>.lock` holding the writer's pid, host, command and start time, created atomically (a hard link of a
complete temporary file, so no reader ever sees a torn lock) and removed on exit. A lock whose pid is gone on
this host is stale (its writer was killed) and is taken over with a warning; a live one is a one-line error
naming its holder.

A run folder (finetune, pretrain, demo, toyworld preview: commands that write in place rather than through
`utils.atomic_folder`) holds `.safeprune.json`, the marker:
  command   which command owns the folder;
  state     created -> training -> finished (`RunFolder.save(state=...)`);
  files     the top-level entries safeprune wrote (only these are ever deleted: `--overwrite`, a demo re-run);
  result    the entries that make up the finished result (removed before a finished run trains further, so a
            folder never shows an old result next to a newer config);
  inputs    what the run read (paths and digests), checked again by `--resume`.
Anything else in the folder is the user's: a fresh start or `--overwrite` with such entries present is a
one-line error naming them; `--resume` keeps them untouched. Temporary leftovers of a killed writer (names
in `TEMP_PREFIXES`) are removed at the next start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
import warnings
from pathlib import Path

from safeprune.errors import UserError, check

MARKER = ".safeprune.json"
STATES = ("created", "training", "finished")
# temporary names written inside a run folder (atomic checkpoints, the result, atomic files, generation folders)
TEMP_PREFIXES = (".step_", ".result.", ".g.")
TMP_INFIX = ".tmp-"  # utils.atomic_file / atomic_folder temporaries: `.NAME.tmp-XXXX`
current_command = "(Python API)"  # what a lock names as its holder; cli.main sets the subcommand
_HELD: set[str] = set()  # lock files this process holds (a lock naming our own pid but not held here is stale)


# ----------------------------------------------------------------------------- the lock


def lock_path(out: str | Path) -> Path:
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    try:  # a killed child that its parent has not reaped yet is a zombie: dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _holder(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text())
        return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def _stale(info: dict, path: Path) -> bool:
    if info.get("host") != socket.gethostname():
        return False  # another machine's process: we cannot tell, so it holds the folder
    if info["pid"] == os.getpid():
        return str(path) not in _HELD
    return not _alive(info["pid"])


@contextlib.contextmanager
def lock(out: str | Path, command: str | None = None):
    """Hold the exclusive write lock on folder `out` for the block (see the module docstring)."""
    path = lock_path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:
        raise UserError(f"cannot create the folder of --out {str(out)!r}: {str(path.parent)!r} is a file; "
                        "pass a path inside a folder") from err
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or current_command,
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}{TMP_INFIX}", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        for _ in range(3):
            try:
                os.link(tmp, path)  # atomic: the lock appears complete or not at all
                break
            except FileExistsError:
                holder = _holder(path)
                if holder is None:
                    if time.time() - _mtime(path) < 5:  # an older writer's lock being written this instant
                        time.sleep(0.2)
                        continue
                    raise UserError(f"{str(path)!r} is not a safeprune lock file; delete it if no safeprune "
                                    f"command writes {str(out)!r}") from None
                if not _stale(holder, path):
                    raise UserError(f"{str(out)!r} is in use by `safeprune {holder.get('command')}` (pid "
                                    f"{holder['pid']} on {holder.get('host')} since {holder.get('since')}); wait for "
                                    f"it to finish or pass another --out") from None
                warnings.warn(f"taking over the stale lock of {str(out)!r} (pid {holder['pid']} is gone)",
                              stacklevel=2)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
        else:
            raise UserError(f"could not lock {str(out)!r} (another writer keeps re-creating {str(path)!r})")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    _HELD.add(str(path))
    try:
        yield path
    finally:
        _HELD.discard(str(path))
        if (_holder(path) or {}).get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# ----------------------------------------------------------------------------- run folders


def check_out(out: str | Path, flag: str = "--out") -> Path:
    """`out` may be a folder or not exist yet; an existing file is a one-line error."""
    out = Path(out)
    check(not out.exists() or out.is_dir(), f"{flag} {str(out)!r} is an existing file, not a folder; pass a folder path")
    return out


def is_temp(name: str) -> bool:
    """A temporary or lock entry (never the user's, never claimed): see TEMP_PREFIXES and TMP_INFIX."""
    return name.startswith(TEMP_PREFIXES) or (name.startswith(".") and TMP_INFIX in name) or \
        (name.startswith(".") and name.endswith(".lock"))


def clean_temp(folder: Path, owned=()) -> list[str]:
    """Remove the temporary leftovers of a killed writer inside `folder`: TEMP_PREFIXES names, and the
    `.NAME.tmp-*` temporaries of the entries this run owns (`owned`; another command's stay)."""
    removed = []
    mine = tuple(f".{name}{TMP_INFIX}" for name in (*owned, MARKER))
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.name.startswith(TEMP_PREFIXES + mine):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                removed.append(entry.name)
    return removed


class RunFolder:
    """One run folder and its marker; create with `open_run` (under `lock`)."""

    def __init__(self, out: Path, command: str, marker: dict | None, foreign: set[str], replace: bool):
        self.out, self.command, self.marker = out, command, marker
        self.foreign = foreign  # the user's entries: never claimed, never deleted
        self.replace = replace  # begin() deletes the earlier run's entries (--overwrite, a demo re-run)

    @property
    def state(self) -> str | None:
        return self.marker["state"] if self.marker else None

    def _entries(self) -> set[str]:
        return {p.name for p in self.out.iterdir() if p.name != MARKER and not is_temp(p.name)} if self.out.is_dir() \
            else set()

    def begin(self, claim=(), **fields) -> RunFolder:
        """Make the folder (or clear what an earlier run wrote into it) and mark it `created`; `claim` names the
        top-level entries this run is about to write (claimed BEFORE they exist, so a kill never leaves one of
        ours that looks like the user's)."""
        if self.replace and self.marker:
            for name in self.marker.get("files", []):
                path = self.out / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
            self.marker = None
        elif self.marker:  # a resumed run: an old result must not sit next to a newer config
            for name in self.marker.get("result", []):
                path = self.out / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
            self.marker["result"] = []
        self.out.mkdir(parents=True, exist_ok=True)
        self.marker = {**(self.marker or {"command": self.command, "files": []}), "state": "created", **fields}
        return self.save(claim)

    def save(self, claim=(), **fields) -> RunFolder:
        """Update the marker (state, inputs, result, ...), adding the entries in `claim` to what this run owns."""
        from safeprune.utils import atomic_file

        check(fields.get("state", self.state) in STATES, f"unknown run state {fields.get('state')!r}")
        self.marker.update(fields)
        claim = set(claim) | set(self.marker.get("result", []))
        overlap = claim & self.foreign
        check(not overlap, f"{str(self.out)!r} holds {', '.join(sorted(overlap))}, which safeprune did not write and "
                           "would overwrite; move it elsewhere")
        self.marker["files"] = sorted(set(self.marker.get("files", [])) | claim)
        with atomic_file(self.out / MARKER) as tmp:
            tmp.write_text(json.dumps(self.marker, indent=1))
        return self


def read_marker(out: Path) -> dict | None:
    path = out / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"the run marker {str(path)!r} is corrupt ({type(err).__name__}); pass a new --out") from err
    check(isinstance(marker, dict) and marker.get("state") in STATES and isinstance(marker.get("files"), list),
          f"the run marker {str(path)!r} is not one safeprune wrote; pass a new --out")
    return marker


def open_run(out: str | Path, command: str, *, resume: bool = False, overwrite: bool = False,
             replace_own: bool = False, legacy=None, clean: bool = True) -> RunFolder:
    """Validate `out` for `command` and return its RunFolder (nothing is created until `begin`).

    resume: continue the run in `out` (any state); overwrite: start again in a folder an earlier `command` run
    wrote; replace_own: a fresh run replaces an earlier run of the same command (demo, toyworld preview);
    legacy(out) -> True (every entry) or the names an older safeprune wrote there adopts a folder written before
    markers existed (resume, replace_own); clean=False leaves temporaries alone (the other processes of a
    multi-process run: only the one holding the lock cleans).
    """
    out = check_out(out)
    check(not (resume and overwrite), "pass either --resume (continue the run) or --overwrite (start again), not both")
    if out.is_dir() and not any(out.iterdir()) or out.is_dir() and not read_marker(out) and \
            all(is_temp(p.name) and p.name.startswith(f".{MARKER}") for p in out.iterdir()):
        if clean:  # killed while its marker was first written: nothing of it exists yet
            clean_temp(out)
    if not out.is_dir() or not any(out.iterdir()):
        check(not resume, f"no run to resume in {str(out)!r} (no checkpoint, no run marker); run without --resume "
                          "to start")
        return RunFolder(out, command, None, set(), False)
    marker = read_marker(out)
    owned = legacy(out) if marker is None and (resume or replace_own) and legacy is not None else None
    if owned:  # written by an older safeprune: adopt what it wrote
        marker = {"command": command, "state": "training",
                  "files": sorted(p.name for p in out.iterdir() if not is_temp(p.name) and (owned is True or p.name in owned))}
    if marker is None:
        raise UserError(f"output folder {str(out)!r} already exists and is not empty (safeprune did not write it); "
                        "pass a new path or empty it")
    check(marker["command"] == command, f"{str(out)!r} holds a `safeprune {marker['command']}` run, not a "
                                        f"`safeprune {command}` one; pass another --out")
    for name in marker["files"] if clean else []:  # e.g. checkpoints/.step_N.tmp-*
        if (out / name).is_dir():
            clean_temp(out / name, [p.name for p in (out / name).iterdir()])
    if clean:
        clean_temp(out, marker["files"])
    run = RunFolder(out, command, marker, set(), False)
    foreign = run._entries() - set(marker["files"])
    if resume:
        run.foreign = foreign
        return run
    if overwrite or replace_own:
        check(not foreign, f"{str(out)!r} holds files this `safeprune {command}` run did not write "
                           f"({', '.join(sorted(foreign)[:5])}); move them elsewhere or pass another --out")
        run.replace = True
        return run
    raise UserError(f"run folder {str(out)!r} already exists and is not empty (a {marker['state']} "
                    f"`safeprune {command}` run); pass --resume to continue it, --overwrite to start again, or a "
                    "new --out")
