"""Atomic writes, JSON helpers, logging set-up and the common `main` wrapper.

A stage writes every output under a temporary sibling name and renames it into place only when
it is complete, so a killed stage leaves either the old complete output or none, never a
half-written file that DVC would then cache.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from stages.lib.params import UserError

log = logging.getLogger("qlora")


def user_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """qlora-pipeline's folder in the user's cache directory: $XDG_CACHE_HOME, or ~/.cache where
    it is unset or empty (as the XDG spec says); outside the repository, so every run and every
    queued experiment's temporary copy of it shares what is kept there."""
    env = os.environ if env is None else env
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qlora-pipeline"


# Speed figures (samples/s, seconds, peak memory) of a stage: beside its metrics.json, not in it,
# because they change from run to run while the metrics must not.
TIMING_FILE = "timing.json"


def setup_logging() -> None:
    """INFO to stderr, one format for every stage; quiet the libraries' chatter."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


def run_main(work: Callable[[], int | None]) -> int:
    """Run a stage body; its exit status is what it returns (0 if nothing). A UserError becomes
    one `error:` line and exit status 1."""
    setup_logging()
    try:
        return work() or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _temp_prefix(target: Path) -> str:
    """The name prefix of this process's temporaries for `target`: the writer's pid in the name
    lets another writer of the same output tell a live writer's temporary from a dead one's."""
    return f".{target.name}.tmp-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_stale(target: Path) -> None:
    """Drop the temporaries that killed earlier writers left beside `target`. Writers outside DVC
    (two predict runs to one --output) can run at once, so a temporary whose writer is still
    running is left alone; one without a pid in its name predates pids in names: dead."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.tmp-(\d+)-")
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        match = pattern.match(leftover.name)
        if match is None or not _alive(int(match.group(1))):
            _remove(leftover)


def process_umask() -> int:
    """The process's umask, read without changing it where Linux reports it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(path: Path) -> None:
    """Give what mkstemp/mkdtemp made (mode 600/700) the permissions a plain open()/mkdir()
    would have: 666/777 less the umask (777 for files with an execute bit). A directory gets it
    recursively; symlinks are left as they are."""
    mask = process_umask()

    def fix(p: Path) -> None:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            return
        full = 0o777 if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111 else 0o666
        os.chmod(p, full & ~mask)

    fix(path)
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                fix(Path(root) / name)


# errno values of a full or read-only disk: turned into one clear line, not a traceback. Some
# writers (safetensors, pyarrow) wrap the OS error in their own exception, keeping its text.
DISK_ERRORS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
               errno.EFBIG: "File too large", errno.EROFS: "Read-only file system"}


def _disk_error(e: BaseException) -> str | None:
    if isinstance(e, OSError) and e.errno in DISK_ERRORS:
        return DISK_ERRORS[e.errno]
    return next((text for text in DISK_ERRORS.values() if text in str(e)), None)


@contextlib.contextmanager
def _cleaned_up(target: Path, tmp: Path) -> Iterator[None]:
    """Around writing `tmp` and renaming it onto `target`: a full or read-only disk becomes one
    UserError line, and the temporary never outlives the block."""
    try:
        yield
    except Exception as e:
        if (reason := _disk_error(e)) is not None:
            raise UserError(f"{target}: cannot write ({reason}); nothing was written") from None
        raise
    finally:
        if tmp.exists():
            _remove(tmp)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces `target` when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    with _cleaned_up(target, tmp):
        yield tmp
        _apply_umask(tmp)
        # os.replace cannot swap a non-empty directory: move the old one aside first, so there
        # is never a moment where `target` holds a mix of old and new files.
        old = None
        if target.exists():
            old = target.with_name(f"{_temp_prefix(target)}old")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            _remove(old)


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w", **open_kwargs: Any) -> Iterator[Any]:
    """Open a temporary sibling of `target` for writing; rename it onto `target` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(target), dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    with _cleaned_up(target, tmp):
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _apply_umask(tmp)
        os.replace(tmp, target)


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON (sorted keys, trailing newline) atomically; for files inside a temp dir too."""
    with atomic_file(path, encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: not found (run the stage that writes it: dvc repro)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_files(paths: Sequence[str | Path]) -> list[str]:
    """sha256_file of each path, in order, several files at a time: hashlib releases the GIL
    while it hashes, so a sharded 16 GB base is hashed at the disk's pace, not one core's."""
    workers = min(len(paths), os.cpu_count() or 1, 8)
    if workers <= 1:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(sha256_file, paths))


# A file named in a sha256 record: one plain name inside its directory (no separators, no `..`).
PLAIN_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def check_sha256_record(path: Path, key: str, value: Any) -> dict[str, str]:
    """A sha256 record read from `path` at `key`: a non-empty {plain file name: hex digest}."""
    if not isinstance(value, dict) or not value:
        raise UserError(f"{path}: {key}: expected a non-empty mapping of file name to sha256, got {value!r}"[:300])
    for name, digest in value.items():
        if not isinstance(name, str) or not PLAIN_FILE_NAME.fullmatch(name):
            raise UserError(f"{path}: {key}.{name}: expected a plain file name inside the directory "
                            "(letters, digits, . _ + -; no / or ..)")
        if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
            raise UserError(f"{path}: {key}.{name}: expected 64 lowercase hex digits, got {digest!r}"[:300])
    return dict(value)


def verify_sha256(directory: Path, expected: dict[str, str], manifest: Path) -> None:
    """Fail with one line when a file differs from the sha256 recorded in `manifest`: a
    truncated or flipped byte in a weights file must stop the load, not give a wrong model."""
    paths = [Path(directory) / name for name in sorted(expected)]
    for path in paths:
        if not path.is_file():
            raise UserError(f"{path}: missing (listed in {manifest})")
    for path, actual in zip(paths, sha256_files(paths)):
        if actual != expected[path.name]:
            raise UserError(f"{path}: corrupt or modified (sha256 differs from {manifest}); "
                            "rerun the stage that wrote it (dvc repro --force <stage>)")


def require_dir(path: str | Path, what: str) -> Path:
    """Fail with one line when an input directory is missing."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: {what} not found (expected a directory; run `dvc repro`)")
    return path
