"""How every command-line tool of this project ends on bad input: one line on stderr, exit
status 2, no traceback.

``train.py``, ``scripts/eval.py``, ``predict.py``, ``export.py``, ``sweep.py`` and the
package's own tools run their ``main`` through ``run``. A user error is an error a person fixes
by changing the command, the config or a file: a ``UserError`` (``ConfigError``, a script's
``UsageError``, ``SweepError`` derive from it), a missing file or directory, a pickle that was
refused as unsafe. It is printed as ``error: <message>`` (a message listing several problems
keeps one line per problem) and ends the process with ``EXIT_USER_ERROR``; ``--verbose`` prints
the traceback as well. Any other exception is a bug and keeps its traceback (exit status 1).

Standard library only, so that it can be imported before anything heavy.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
import traceback
from collections.abc import Callable, Sequence
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
