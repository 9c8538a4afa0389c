"""Files on disk: atomic writes, confined bounded reads, atomic directory replacement, locks.

What artifacts (checkpoints, exports) rely on; see docs/threat-model.md for the guarantees.

- `atomic_write`: one file through a temporary sibling and `os.replace`, with the umask's
  permissions (never ``tempfile``'s 0600).
- `ArtifactDir`: reads of the files an artifact names: a plain name inside the directory, a
  symlink only when it stays inside, only regular files (``O_NONBLOCK`` + ``fstat``), at most a
  stated number of bytes, and never more than ``fstat`` said.
- `replace_dir`: put a freshly built directory in place of an old one so that a reader sees the
  old or the new one, never none (``renameat2(RENAME_EXCHANGE)`` on Linux), keeping every entry
  of the old directory that is not the artifact's own.
- `writer_lock` and `clean_stale`: one writer per target (a typed error on contention), and the
  temporaries a killed writer left are recovered or removed by the next one.

Layer 0: the standard library and `errors` only.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import sys
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Final, TypeVar

from .errors import WorldFluxRegistryError

T = TypeVar("T")

__all__ = [
    "MAX_ARTIFACT_FILE_BYTES",
    "MAX_JSON_FILE_BYTES",
    "ArtifactDir",
    "atomic_write",
    "check_plain_name",
    "clean_stale",
    "default_file_mode",
    "read_consistent",
    "replace_dir",
    "stale_siblings",
    "temp_sibling",
    "writer_lock",
]

#: Largest JSON file an artifact may hold (config.json, manifest.json): 16 MiB.
MAX_JSON_FILE_BYTES: Final = 16 * 1024 * 1024
#: Largest weights or graph file read or hashed: 64 GiB.
MAX_ARTIFACT_FILE_BYTES: Final = 64 * 1024**3

_O_NONBLOCK: Final = getattr(os, "O_NONBLOCK", 0)
_O_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC: Final = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY: Final = getattr(os, "O_DIRECTORY", 0)
_O_BINARY: Final = getattr(os, "O_BINARY", 0)
_DIR_FD: Final = os.open in os.supports_dir_fd and _O_DIRECTORY != 0
_BAD_NAME: Final = re.compile(r"[/\\\x00]")


def default_file_mode() -> int:
    """``0o666`` less the process umask: the mode ``open(path, "w")`` would give."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp sibling and `os.replace`, creating parents.

    Readers see the old file or the new one, never a partial write; the temp file is removed
    if anything fails. The file gets the umask's permissions, like any ``open(..., "w")``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if hasattr(os, "fchmod"):
                os.fchmod(fh.fileno(), default_file_mode())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_plain_name(
    name: object, *, what: str, error: type[WorldFluxRegistryError], hint: str | None = None
) -> str:
    """Return ``name`` when it is a plain file name (no directory part, not ``.``/``..``).

    Raises:
        error: naming ``what`` and the offending value (shortened).
    """
    if not isinstance(name, str) or not name or name in (".", "..") or _BAD_NAME.search(name):
        shown = repr(name)[:120]
        raise error(
            f"{what} {shown} is not a plain file name inside the directory",
            hint=hint or "an artifact names its files by plain name; re-create it",
        )
    return name


class ArtifactDir:
    """An artifact directory opened once, whose files are read by plain name, confined.

    On POSIX the directory is opened as a file descriptor and files are opened relative to it,
    so a directory swapped in by a concurrent writer never mixes into one read: every file
    comes from the same version of the directory. Close it (or use ``with``) when done.

    Args:
        root: The directory.
        error: The error type every refusal raises (`CheckpointError`, `ExportError`...).
    """

    def __init__(self, root: str | os.PathLike[str], error: type[WorldFluxRegistryError]) -> None:
        self.root = Path(root)
        self.error = error
        self._fd: int | None = None
        if _DIR_FD:
            try:
                self._fd = os.open(self.root, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
            except OSError as exc:
                raise error(
                    f"cannot open directory {self.root}: {exc.strerror}",
                    hint="check the path and its permissions",
                ) from None
        elif not self.root.is_dir():
            raise error(f"{self.root} is not a directory", hint="check the path")

    def __enter__(self) -> ArtifactDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the directory descriptor."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def fileno(self) -> int:
        """The directory's descriptor (`ValueError` where directories are not opened)."""
        if self._fd is None:
            raise ValueError("no directory descriptor on this platform")
        return self._fd

    def replaced(self) -> bool:
        """Whether ``root`` now names another directory than the one opened (a writer swapped
        a new version in); False where directories are not opened."""
        if self._fd is None:
            return False
        try:
            return os.stat(self.root).st_ino != os.fstat(self._fd).st_ino
        except OSError:
            return True

    def exists(self, name: str) -> bool:
        """Whether an entry ``name`` (of any type) is in the directory."""
        try:
            if self._fd is not None:
                os.stat(name, dir_fd=self._fd, follow_symlinks=False)
            else:
                os.lstat(self.root / name)
        except OSError:
            return False
        return True

    def _open(self, name: object, what: str) -> tuple[int, int]:
        """(descriptor, size) of the regular file ``name``; every refusal raises ``error``."""
        plain = check_plain_name(name, what=what, error=self.error)
        path = self.root / plain
        flags = os.O_RDONLY | _O_NONBLOCK | _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY
        try:
            if self._fd is not None:
                fd = os.open(plain, flags, dir_fd=self._fd)
            else:
                fd = os.open(path, flags)
        except FileNotFoundError:
            raise self.error(
                f"{what} {plain!r} is missing from {self.root}",
                hint="the artifact is incomplete; copy the whole directory or write it again",
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EMLINK):
                raise self.error(
                    f"cannot open {what} {path}: {exc.strerror}", hint="check its permissions"
                ) from None
            fd = self._open_symlink(path, flags, what)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise self.error(
                    f"{what} {path} is not a regular file ({_kind(info.st_mode)})",
                    hint="an artifact holds only regular files",
                )
        except BaseException:
            os.close(fd)
            raise
        return fd, info.st_size

    def _open_symlink(self, path: Path, flags: int, what: str) -> int:
        root = os.path.realpath(self.root)
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            raise self.error(
                f"{what} {path} is a symlink leading outside the directory (to {real})",
                hint="an artifact reads only files inside its own directory; copy the file in",
            )
        try:
            return os.open(real, flags)
        except OSError as exc:
            raise self.error(
                f"cannot open {what} {path} (a symlink to {real}): {exc.strerror}",
                hint="replace the symlink with the file itself",
            ) from None

    def read(self, name: object, *, what: str, max_bytes: int = MAX_JSON_FILE_BYTES) -> bytes:
        """The bytes of the regular file ``name``, at most ``max_bytes`` of them.

        Raises ``error`` for a non-plain name, a symlink leaving the directory, anything but a
        regular file, a file over ``max_bytes``, or one that holds more than ``fstat`` said
        (``/proc`` files report size 0).
        """
        return b"".join(self._chunks(name, what, max_bytes, 1 << 24, "read"))

    def sha256(self, name: object, *, what: str, max_bytes: int = MAX_ARTIFACT_FILE_BYTES) -> str:
        """Hex sha256 of the regular file ``name`` (same checks as `read`, streamed)."""
        digest = hashlib.sha256()
        for chunk in self._chunks(name, what, max_bytes, 1 << 20, "hashed"):
            digest.update(chunk)
        return digest.hexdigest()

    def _chunks(
        self, name: object, what: str, max_bytes: int, size_hint: int, verb: str
    ) -> Iterator[bytes]:
        """The bytes of the checked regular file ``name``, exactly as many as ``fstat`` said."""
        fd, size = self._open(name, what)
        try:
            self._check_size(name, size, max_bytes, what)
            left = size
            while left > 0:
                chunk = os.read(fd, min(left, size_hint))
                if not chunk:
                    break
                yield chunk
                left -= len(chunk)
            if left or os.read(fd, 1):
                raise self.error(
                    f"{what} {self.root / str(name)} changed size while it was {verb}",
                    hint="another process is writing it; try again when it is done",
                )
        finally:
            os.close(fd)

    def _check_size(self, name: object, size: int, max_bytes: int, what: str) -> None:
        if size > max_bytes:
            raise self.error(
                f"{what} {self.root / str(name)} is {size} bytes; the limit is {max_bytes}",
                hint="see docs/threat-model.md for the size limits",
            )


def read_consistent(
    root: str | os.PathLike[str],
    error: type[WorldFluxRegistryError],
    read: Callable[[ArtifactDir], T],
    attempts: int = 8,
) -> T:
    """``read(artifact_dir)`` on one opened version of ``root``; retried on the new version
    when it raised ``error`` because a writer swapped the directory while it read."""
    for attempt in range(attempts):
        with ArtifactDir(root, error) as adir:
            try:
                return read(adir)
            except error:
                if attempt < attempts - 1 and adir.replaced():
                    continue
                raise
    raise AssertionError("unreachable")


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


# -- writing directories -----------------------------------------------------------------------
def temp_sibling(target: Path, kind: str = "tmp") -> Path:
    """A fresh name ``.<target>.<kind>-<random>`` beside ``target`` (not created)."""
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:12]}"


def stale_siblings(target: Path) -> list[Path]:
    """Temporaries a writer of ``target`` leaves while it works (``.<name>.tmp-*``/``old-*``)."""
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return []
    prefix = f".{target.name}."
    return sorted(
        p
        for p in entries
        if p.name.startswith(prefix)
        and re.fullmatch(r"(tmp|old)-[0-9a-f]{8,32}", p.name[len(prefix) :])
    )


@contextlib.contextmanager
def writer_lock(
    target: Path, error: type[WorldFluxRegistryError], what: str = "artifact"
) -> Iterator[None]:
    """Hold the one writer's lock of ``target`` (``.<name>.lock`` beside it) while inside.

    Raises ``error`` at once when another writer holds it. The lock file is removed on exit;
    a writer that finds it was replaced while it waited retries, so two writers never both
    hold the lock. Without ``fcntl`` (Windows) no lock is taken.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = target.parent / f".{target.name}.lock"
    for _ in range(16):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _O_CLOEXEC | _O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise error(
                f"cannot write the {what} {target}: {exc.strerror} ({exc.filename})",
                hint="choose a directory you can write to",
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise error(
                    f"another process is writing the {what} {target} (it holds {path})",
                    hint="wait for that save to finish, or write to another directory",
                ) from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # removed by the writer that just finished: lock the new one
            os.close(fd)
            continue
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            os.close(fd)
        return
    raise error(f"could not take the writer's lock {path}", hint="try again")


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_dir(
    new: Path,
    target: Path,
    ours: Callable[[Path], set[str]],
    *,
    error: type[WorldFluxRegistryError],
) -> list[str]:
    """Put the complete directory ``new`` at ``target``; return the names kept from the old one.

    When ``target`` exists it is swapped with ``new`` in one ``renameat2(RENAME_EXCHANGE)``
    where the platform has it (a reader sees the old or the new directory, never none), else
    with two renames (a reader may briefly see none; `clean_stale` recovers a kill between
    them). Then every entry of the old directory outside ``ours(old)`` (the artifact's own
    files) is moved into the new one and the old one is removed.

    Raises:
        error: an entry that is not the artifact's own has the name of a new file (nothing
            is replaced; ``new`` is left for the caller to remove).
    """
    if not target.exists():
        os.replace(new, target)
        return []
    own = ours(target)
    foreign = sorted(p.name for p in target.iterdir() if p.name not in own)
    clash = [n for n in foreign if (new / n).exists() or os.path.lexists(new / n)]
    if clash:
        raise error(
            f"{target} holds {clash}, which are not part of the artifact but have the names "
            "of files it writes; refusing to replace them",
            hint="move them away, or write to another directory",
        )
    if _exchange(new, target):
        old = new
    else:
        old = temp_sibling(target, "old")
        os.replace(target, old)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(old, target)
            raise
    kept = _move_foreign(old, target, ours(old))
    shutil.rmtree(old, ignore_errors=True)
    return kept


def _move_foreign(old: Path, target: Path, own: Iterable[str]) -> list[str]:
    own = set(own)
    kept = []
    for entry in sorted(old.iterdir()):
        if entry.name in own or os.path.lexists(target / entry.name):
            continue
        os.rename(entry, target / entry.name)
        kept.append(entry.name)
    return kept


def clean_stale(
    target: Path, ours: Callable[[Path], set[str]], *, keep: Path | None = None
) -> list[str]:
    """Recover or remove what a killed writer of ``target`` left; return what was done.

    Call it holding `writer_lock`. A missing ``target`` with a complete ``.old-*`` copy (a kill
    between two renames) gets it back; entries of a temporary that are not the artifact's own
    (user files moved there during a replacement) go back into ``target``; the artifact's own
    files are removed, and a temporary that still holds something of the user's is left in
    place with a warning. ``keep`` is the caller's own temporary, left alone.
    """
    done = []
    for stale in stale_siblings(target):
        if keep is not None and stale.name == keep.name:
            continue
        if not stale.is_dir() or stale.is_symlink():
            with contextlib.suppress(OSError):
                stale.unlink()
            continue
        if not os.path.lexists(target) and stale.name.split(".")[-1].startswith("old-"):
            os.replace(stale, target)
            done.append(f"restored {target} from {stale.name}")
            continue
        if target.is_dir():
            for name in _move_foreign(stale, target, ours(stale)):
                done.append(f"moved {name} back into {target}")
        own = ours(stale)
        left = [p.name for p in stale.iterdir() if p.name not in own]
        if left:
            warnings.warn(
                f"{stale} holds {left}, not part of the artifact; left in place",
                stacklevel=2,
            )
            continue
        shutil.rmtree(stale, ignore_errors=True)
        done.append(f"removed {stale.name}")
    return done
