"""How every command-line tool of this project ends on bad input: one line on stderr, exit
status 2, no traceback.

``train.py``, ``scripts/eval.py``, ``predict.py``, ``export.py``, ``sweep.py`` and the
package's own tools run their ``main`` through ``run``. A user error is an error a person fixes
by changing the command, the config or a file: a ``UserError`` (``ConfigError``, a script's
``UsageError``, ``SweepError`` derive from it), a missing file or directory, a pickle that was
refused as unsafe. It is printed as ``error: <message>`` (a message listing several problems
keeps one line per problem) and ends the process with ``EXIT_USER_ERROR``; ``--verbose`` prints
the traceback as well. Any other exception is a bug and keeps its traceback (exit status 1).

Importing this module also makes the process's first ``import tensorflow`` quiet
(``quiet_import``), so that a tool's one line is not preceded by TensorFlow's
start-up lines.

Standard library only, so that it can be imported before anything heavy.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.util
import os
import pickle
import re
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

EXIT_USER_ERROR = 2  # argparse's status for a bad command line; the same for every bad input
VERBOSE_FLAG = '--verbose'
VERBOSE_HELP = 'on an error, print the traceback as well as the one-line message'


class UserError(Exception):
    """Bad input that a person can fix (a config value, a path, a flag): reported as one line
    ``error: ...`` with exit status 2, without a traceback."""


# Errors that mean "the input is wrong", whichever layer raised them.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    pickle.UnpicklingError,  # torch.load(weights_only=True) refusing arbitrary objects
)


# Set by a parent that runs train.py as a child (scripts/sweep.py, scripts/noisy_student.py).
DIE_WITH_PARENT_ENV = 'EFFICIENTNET_DIE_WITH_PARENT'


def die_with_parent_if_asked() -> None:
    """With ``$EFFICIENTNET_DIE_WITH_PARENT`` set, asks Linux to SIGKILL this process when its
    parent dies, so that a killed sweep or driver leaves no run behind to clash with the
    rerun's. (Set in the child itself: a ``preexec_fn`` would fork the multithreaded parent.)"""
    import os
    import signal

    if not os.environ.get(DIE_WITH_PARENT_ENV):
        return
    try:
        import ctypes

        ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() == 1:  # the parent died before the call
        os._exit(1)


def format_problems(header: str, problems: Sequence[str]) -> str:
    """One problem: ``header: problem`` on one line; several: the header, then one line each
    (``  - problem``), so that every problem is reported at once and each stays greppable."""
    if len(problems) == 1:
        return f'{header}: {problems[0]}'
    return f'{header}:\n  - ' + '\n  - '.join(problems)


def message(error: BaseException) -> str:
    """The text printed after ``error:``: the exception's own lines, with the long multi-page
    explanations some libraries attach (torch's unsafe-pickle refusal) cut to their first
    line. Messages built as a list of problems (``invalid config:\\n  - ...``) stay whole."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, pickle.UnpicklingError):
        found = re.search(r'Unsupported global: GLOBAL (\S+)', text)
        what = f'an object of type {found.group(1)}' if found else 'Python objects'
        return (
            f'refused to unpickle the weights file: it holds {what} besides tensors, and '
            'unpickling those could run arbitrary code; save a plain state dict of tensors '
            'where the file was made (torch.save(model.state_dict(), path))'
        )
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f'{error.filename}: {error.strerror}'
    return text


def wants_traceback(argv: Sequence[str] | None) -> bool:
    """Whether ``--verbose`` was given (looked up before any parsing, which may itself fail)."""
    args = sys.argv[1:] if argv is None else argv
    return VERBOSE_FLAG in args


def report(error: BaseException, *, verbose: bool) -> int:
    """Prints a user error (and with ``verbose`` its traceback); returns ``EXIT_USER_ERROR``."""
    if verbose:
        traceback.print_exception(error, file=sys.stderr)
    print(f'error: {message(error)}', file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def run(main: Callable[[Any], int | None], argv: Sequence[str] | None = None) -> int:
    """Calls ``main(argv)``; returns its status (None: 0), or ``EXIT_USER_ERROR`` after printing
    a user error in one line. Other exceptions propagate with their traceback."""
    try:
        code = main(argv)
    except USER_ERRORS as e:
        return report(e, verbose=wants_traceback(argv))
    return 0 if code is None else code


class ArgumentParser(argparse.ArgumentParser):
    """argparse with ``--verbose`` and one-line errors: a bad argument raises UserError
    (reported by ``run`` with exit status 2, as argparse itself would exit) instead of
    printing the usage block."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument(VERBOSE_FLAG, action='store_true', help=VERBOSE_HELP)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f'{message} (see {self.prog} --help)')


@contextlib.contextmanager
def _native_stderr_captured() -> Iterator[None]:
    """File descriptor 2 (what native code writes to as well as ``sys.stderr``) goes to a
    temporary file; its text is dropped, or written back to stderr if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                yield
            except BaseException:
                sys.stderr.flush()
                os.dup2(saved, 2)
                captured.seek(0)
                os.write(2, captured.read())
                raise
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
    finally:
        os.close(saved)


class _QuietLoader(importlib.abc.Loader):
    """Runs another loader's ``exec_module`` with stderr captured, then steps aside."""

    def __init__(self, loader: Any, finder: _QuietImport):
        self._loader = loader
        self._finder = finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self._loader
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self._finder)  # loaded once; later imports find it as usual
        with _native_stderr_captured():
            self._loader.exec_module(module)


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds one top-level package with the other finders and hands out its spec with a
    _QuietLoader. It stays in place until the package is executed: a ``find_spec`` that only
    asks whether the package is installed (opt_einsum's does, for tensorflow) loads nothing."""

    def __init__(self, package: str):
        self.package = package
        self._finding = False

    def find_spec(self, name, path=None, target=None):
        if name != self.package or self._finding:
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._finding = False
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader, self)
        return spec


def quiet_import(package: str) -> None:
    """Make the first import of the top-level ``package`` in this process (from any module)
    write nothing to stderr unless it fails, when what it wrote is shown. Does nothing once the
    package is imported, or where it is not installed (the import then fails as usual).

    For tensorflow, called below: on some CPUs (Intel's, where it turns on its oneDNN ops) its
    native code logs "oneDNN custom operations are on" and absl's "All log messages before
    absl::InitializeLog() ..." straight to file descriptor 2 while it loads, before its logging
    is set up, so ``TF_CPP_MIN_LOG_LEVEL`` does not hide them."""
    if package in sys.modules:
        return
    if not any(isinstance(f, _QuietImport) and f.package == package for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport(package))


quiet_import('tensorflow')
