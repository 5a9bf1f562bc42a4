"""Paths a user gives (workdirs, weights, data dirs, outputs): local paths or ``gs://`` URLs.

Everything that reads or writes such a path goes through ``etils.epath``: its local backend is
plain ``os``; for ``gs://`` it uses ``tf.io.gfile`` (TensorFlow is imported only then). This
module adds what epath leaves to its callers:

- ``absolute``: the absolute form of a local path, a URL unchanged (``os.path.abspath`` and
  ``epath.Path.resolve`` turn ``gs://bucket/run`` into ``<cwd>/gs:/bucket/run``);
- ``write_atomic``: a file that readers see whole or not at all, on either kind of path;
- ``listdir``: entry names without the trailing '/' gfile gives subdirectories on gs://;
- ``problem``/``problems``: why a ``gs://`` path cannot be used (no credentials, no such
  bucket), asked once per bucket at start-up, before anything compiles or is written.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterable

from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """Whether ``path`` is a URL (gs://, s3://, ...) rather than a local path."""
    return '://' in os.fspath(path)


def absolute(path: PathLike) -> str:
    """A local path made absolute (``~`` expanded); a URL unchanged but for a trailing '/'."""
    path = os.fspath(path)
    if is_remote(path):
        scheme, rest = path.split('://', 1)
        return f'{scheme}://{rest.rstrip("/")}' if rest.strip('/') else path
    return os.path.abspath(os.path.expanduser(path))


def as_path(path: PathLike, *parts: str) -> epath.Path:
    """``epath.Path`` of ``absolute(path)`` joined with ``parts``: ``exists``, ``read_bytes``,
    ``open``, ``iterdir`` ... on either kind of path."""
    return epath.Path(absolute(path), *parts)


def listdir(path: PathLike) -> list[str]:
    """Names of the entries of directory ``path`` (no trailing '/'), sorted; [] if it is none."""
    p = as_path(path)
    if not p.is_dir():
        return []
    return sorted(child.name for child in p.iterdir())


def write_atomic(path: PathLike, data: bytes | str) -> str:
    """Writes ``data`` to ``path`` so that a reader sees the old file or the new one, never a
    part. Local: a temporary file beside it (parent directories created), then a rename.
    gs://: one upload (an object appears only once its upload completes; a rename there would
    be a copy plus a delete). Returns the absolute path."""
    path = absolute(path)
    raw = data.encode() if isinstance(data, str) else data
    if is_remote(path):  # no directories to create: a bucket holds objects named by path
        epath.Path(path).write_bytes(raw)
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # A fresh name beside the target ('x': never someone else's file), created with the
    # process's umask like any other file it writes (mkstemp would make it private).
    tmp = os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.{uuid.uuid4().hex}')
    try:
        with open(tmp, 'xb') as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def problem(path: PathLike | None) -> str | None:
    """Why ``path`` cannot be used, for a ``gs://`` path: google-cloud-storage missing, no
    credentials, no such bucket, or the bucket unreachable; None when it can, and for local
    paths and other schemes. One request per bucket per process (cached)."""
    if not path:
        return None
    path = os.fspath(path)
    if not path.startswith('gs://'):
        return None
    bucket = path[len('gs://') :].split('/', 1)[0]
    if not bucket:
        return 'no bucket named (expected gs://BUCKET/...)'
    return _bucket_problem(bucket)


def problems(named: Iterable[tuple[str, PathLike | None]]) -> list[str]:
    """``'FLAG=PATH: why'`` (``'PATH: why'`` for an empty flag, a positional argument) for each
    (flag, path) whose path ``problem`` refuses, in order: the one-line start-up errors of
    train.py and the tools."""
    out = []
    for flag, path in named:
        reason = problem(path)
        if reason:
            out.append(f'{flag}={os.fspath(path)}: {reason}' if flag else f'{path}: {reason}')
    return out


@functools.cache
def _bucket_problem(bucket: str) -> str | None:
    try:
        from google.api_core import exceptions as api_errors
        from google.auth import exceptions as auth_errors
        from google.cloud import storage
    except ImportError:
        return (
            'google-cloud-storage is not installed, and orbax needs it for gs:// checkpoints '
            '(pip install google-cloud-storage)'
        )
    try:
        client = storage.Client()  # STORAGE_EMULATOR_HOST: the emulator, no credentials needed
    except auth_errors.DefaultCredentialsError:
        return (
            'no Google Cloud credentials found (run gcloud auth application-default login, or '
            'set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file)'
        )
    try:
        # The request orbax itself makes (buckets.get) before it lists checkpoint steps.
        found = client.lookup_bucket(bucket, timeout=30, retry=None)
    except auth_errors.GoogleAuthError as e:
        return f'the Google Cloud credentials do not work ({_first_line(e)})'
    except api_errors.Forbidden as e:
        return (
            f'the credentials may not read bucket {bucket}; orbax needs its '
            f'storage.buckets.get permission ({_first_line(e)})'
        )
    except Exception as e:  # noqa: BLE001 - unreachable, timeouts: all mean "cannot use it"
        return f'cannot reach bucket {bucket} ({type(e).__name__}: {_first_line(e)})'
    if found is None:
        return (
            f'bucket {bucket} does not exist (create it with gcloud storage buckets create '
            f'gs://{bucket})'
        )
    return None


def _first_line(error: Exception) -> str:
    text = str(getattr(error, 'message', None) or error).strip()
    return text.splitlines()[0] if text else type(error).__name__
