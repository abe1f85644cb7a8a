"""Where datasets, checkpoints and exports live: local paths and ``gs://`` (Cloud Storage), one layer.

Every path the generator, the readers, ``export`` and ``train`` read or write goes through here, on
top of ``etils.epath`` (what orbax and grain use), whose ``gs://`` backend is fsspec's ``gcsfs``.
TensorFlow's ``gfile`` would be chosen when TensorFlow is installed; it is switched off here
(``EPATH_USE_TF=false`` unless set) so that this code, orbax's metadata and tfds' metadata writer
all go through the one client, gcsfs, which takes Application Default Credentials (on a Cloud TPU VM
the VM's service account) and honours ``STORAGE_EMULATOR_HOST`` (tests). Orbax writes checkpoint
arrays through tensorstore, which has its own GCS client (same credentials; its endpoint is
``TENSORSTORE_GCS_HTTP_URL``).

A path is local (no ``scheme://``) or ``gs://BUCKET/...``; any other scheme is refused with one
line (``StorageError``, a ``ValueError``) before anything is written, never taken for a local
folder named ``gs:``. Object stores have no rename: a file is written whole and published with one
upload (a killed upload publishes nothing), so the completion marks written last (a shard's
``NAME.json``, ``manifest.json``) mean what they say. Local writes keep temp file + fsync + rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import shutil
import tempfile
from typing import IO, Iterator

os.environ.setdefault("EPATH_USE_TF", "false")  # before etils picks a gs:// backend (it caches the choice)


def _fresh_listings() -> None:
    """gcsfs keeps folder listings forever by default; other processes (other hosts) write to the
    same prefix, so a listing must be read from the bucket each time (resume, gathering summaries)."""
    import fsspec.config

    fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


_fresh_listings()

__all__ = ["StorageError", "SCHEMES", "scheme", "is_remote", "check", "path", "join", "basename", "exists",
           "isdir", "listdir", "makedirs", "read_bytes", "read_text", "write_bytes", "open_file", "remove",
           "upload", "download", "local_copy", "staging_dir", "sha256", "fsync"]

# scheme -> the Python package that serves it (fsspec implementation behind etils.epath)
SCHEMES = {"gs": "gcsfs"}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(ValueError):
    """A path this layer cannot serve (unknown scheme, missing backend): a user error, one line."""


def scheme(p) -> str | None:
    """``"gs"`` for ``gs://b/x``, None for a local path."""
    m = _SCHEME.match(os.fspath(p))
    return m.group(1).lower() if m else None


def is_remote(p) -> bool:
    return scheme(p) is not None


def check(p) -> str:
    """``p`` as a string, or a one-line ``StorageError`` if no backend here can store it."""
    s, text = scheme(p), os.fspath(p)
    if s is None:
        return text
    if s not in SCHEMES:
        raise StorageError(f"{text}: {s}:// is not a supported storage location (use a local path or "
                           "gs://BUCKET/PREFIX)")
    try:
        __import__(SCHEMES[s])
    except ImportError as e:
        raise StorageError(f"{text}: {s}:// needs the {SCHEMES[s]} package (pip install {SCHEMES[s]}): {e}") from None
    if not re.match(rf"^{s}://[^/]+", text):
        raise StorageError(f"{text}: no bucket named (use {s}://BUCKET/PREFIX)")
    return text


def path(p):
    """An ``etils.epath.Path`` for a checked local or gs:// path."""
    from etils import epath

    return epath.Path(check(p))


def join(base, *parts: str) -> str:
    base = os.fspath(base)
    return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def basename(p) -> str:
    return posixpath.basename(os.fspath(p).rstrip("/"))


def exists(p) -> bool:
    return path(p).exists()


def isdir(p) -> bool:
    return path(p).is_dir()


def listdir(p) -> list[str]:
    """Names in folder ``p`` (what a bucket holds under the prefix ``p/``), sorted; [] if none."""
    d = path(p)
    if not is_remote(p):
        return sorted(os.listdir(d)) if d.is_dir() else []
    try:
        return sorted({c.name for c in d.iterdir()})
    except FileNotFoundError:
        return []


def makedirs(p) -> None:
    """A local folder (object stores have no folders: nothing to do there)."""
    if not is_remote(p):
        os.makedirs(check(p), exist_ok=True)


def read_bytes(p) -> bytes:
    return path(p).read_bytes()


def read_text(p) -> str:
    return read_bytes(p).decode("utf-8")


def open_file(p, mode: str = "rb") -> IO:
    """A file object to read (``rb``/``r``) a local file or an object."""
    return path(p).open(mode)


def fsync(local_path: str) -> None:
    """fsync a local file or folder (a folder's entry list makes a rename durable)."""
    fd = os.open(local_path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(p, data: bytes | str) -> None:
    """Write ``p`` whole: locally temp file + fsync + rename, remotely one upload (an object appears
    only once complete). Readers never see a partial file."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    if is_remote(p):
        path(p).write_bytes(data)
        return
    p = check(p)
    tmp = f"{p}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    fsync(os.path.dirname(os.path.abspath(p)))


def remove(p) -> None:
    path(p).unlink()


def upload(local: str, dst) -> None:
    """Publish the finished local file ``local`` at ``dst`` with one upload (local ``dst``: copy to a
    temp name + fsync + rename). On an error the upload is discarded, not finalised."""
    if not is_remote(dst):
        dst = check(dst)
        tmp = f"{dst}.tmp-{os.getpid()}"
        shutil.copyfile(local, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
        fsync(os.path.dirname(os.path.abspath(dst)))
        return
    out = path(dst).open("wb")
    try:
        with open(local, "rb") as src:
            shutil.copyfileobj(src, out, 8 << 20)
    except BaseException:
        discard = getattr(out, "discard", None)  # fsspec: cancel the upload instead of finalising it
        if discard is not None:
            with contextlib.suppress(Exception):
                discard()
        raise
    out.close()


def download(src, local: str) -> None:
    with open_file(src, "rb") as f, open(local, "wb") as out:
        shutil.copyfileobj(f, out, 8 << 20)


@contextlib.contextmanager
def local_copy(p) -> Iterator[str]:
    """A local path holding ``p``'s bytes (``p`` itself when local; a temporary download otherwise),
    for readers that only open local files (ArrayRecord's C++ reader)."""
    if not is_remote(p):
        yield check(p)
        return
    with tempfile.TemporaryDirectory(prefix="datasetdm-") as d:
        local = os.path.join(d, basename(p))
        download(p, local)
        yield local


@contextlib.contextmanager
def staging_dir(folder) -> Iterator[str]:
    """Where to write files bound for ``folder`` before publishing them: ``folder`` itself when
    local, a temporary local folder (removed after) when remote."""
    if not is_remote(folder):
        yield check(folder)
        return
    check(folder)
    with tempfile.TemporaryDirectory(prefix="datasetdm-stage-") as d:
        yield d


def sha256(p) -> str:
    h = hashlib.sha256()
    with open_file(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
