"""Joining the other processes of a multi-process run, and leaving promptly when one dies.

The processes run one program: every step's collectives and every checkpoint need all of them.
When one dies (``kill -9``, out of memory, a lost host) the others cannot go on. jax's
coordination service notices once the dead process has missed its heartbeats for
``heartbeat_timeout_seconds`` (jax's default 100 s; the survivors then aborted, SIGABRT, with a
C++ stack trace). Here:

- ``initialize`` asks for ``HEARTBEAT_TIMEOUT_S`` (10 s), where this jax takes the argument
  (looked up in ``jax.distributed.initialize``'s signature, so a jax without it still runs);
- where jaxlib's client takes a ``missed_heartbeat_callback`` (jaxlib 0.10.2 does), the
  survivors' callback prints one line naming the lost process and exits with
  ``EXIT_PEER_LOST``, instead of jax's abort; elsewhere jax's own abort ends them;
- ``wait_for_lost_peer`` lets a process whose collective failed (the dead peer's connection
  closed) wait for that verdict instead of raising a bare transport error.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import sys
import time
from typing import Any

import jax
from absl import logging

# Seconds without a heartbeat after which a process counts as dead. The heartbeats come from
# jax's own C++ threads, not from Python, so a long compilation or a busy host does not delay
# them; a lower value would end a run for a network hiccup of that length.
HEARTBEAT_TIMEOUT_S = 10
EXIT_PEER_LOST = 3  # a process of the run was lost: restart them all to resume

_state: dict[str, Any] = {'handler': False, 'heartbeat_timeout_s': HEARTBEAT_TIMEOUT_S}


def timeout_kwargs(heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> dict[str, Any]:
    """The heartbeat keyword argument of ``jax.distributed.initialize``, where this jax has
    it (0.4.36 and later); {} otherwise."""
    params = inspect.signature(jax.distributed.initialize).parameters
    if 'heartbeat_timeout_seconds' in params:
        return {'heartbeat_timeout_seconds': int(heartbeat_timeout_s)}
    return {}


def initialize(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    *,
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
) -> None:
    """Joins the other processes of a multi-process run, before anything touches a device.

    The arguments name the coordinator (GPU clusters, local runs). Without them, on Cloud TPU
    jax finds the slice itself: on GKE (and under launchers that export it) from environment
    variables, on a GCE TPU VM only from the VM's metadata server, so wherever libtpu is
    installed jax is asked. A single-host TPU VM becomes a run of one process; where jax finds
    no slice (libtpu on a machine without TPUs) the run stays one process.
    """
    timeouts = timeout_kwargs(heartbeat_timeout_s)
    _state['heartbeat_timeout_s'] = heartbeat_timeout_s
    if coordinator_address or (num_processes or 1) > 1:
        _with_lost_peer_handler(
            lambda: jax.distributed.initialize(
                coordinator_address=coordinator_address,
                num_processes=num_processes,
                process_id=process_id,
                **timeouts,
            )
        )
    elif os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('CLOUD_TPU_TASK_ID'):
        # GKE, or a launcher that exports the slice
        _with_lost_peer_handler(lambda: jax.distributed.initialize(**timeouts))
    elif importlib.util.find_spec('libtpu') is not None:
        try:
            _with_lost_peer_handler(lambda: jax.distributed.initialize(**timeouts))
        except ValueError as e:  # jax's "coordinator_address should be defined": no TPU slice
            logging.info('no TPU slice found (%s): running as one process', e)


def lost_peer_message(status: str, process_id: int, num_processes: int) -> str:
    """The one line a survivor prints: which process was lost (the task numbers in the
    coordination service's status are process ids; a status naming none, seen by a process
    other than 0, means the coordinator itself, process 0, is unreachable)."""
    tasks = {int(t) for t in re.findall(r'task[: ]?(\d+)', status, flags=re.IGNORECASE)}
    lost = sorted(tasks - {process_id})
    if lost:
        who = ', '.join(f'process {i} of {num_processes}' for i in lost)
    elif process_id != 0:
        who = f'process 0 of {num_processes} (the coordinator)'
    else:
        who = f'a process of {num_processes}'
    return (
        f'error: lost {who}: no heartbeat for {_state["heartbeat_timeout_s"]} s (killed, out '
        f'of memory, or its host is gone); process {process_id} stops too. Restart every '
        'process with the same command: the run resumes from its last complete checkpoint.'
    )


def _on_lost_peer(status: Any) -> None:
    """jaxlib's missed_heartbeat_callback: one line, then exit at once (the run cannot go on;
    in-flight saves stay unfinished temporary directories, never checkpoints)."""
    g = _global_state()
    pid = getattr(g, 'process_id', None)
    n = getattr(g, 'num_processes', None)
    try:
        line = lost_peer_message(str(status), int(pid or 0), int(n or 0))
        print(line, file=sys.stderr, flush=True)
        logging.error('%s (coordination service: %s)', line, str(status).splitlines()[0])
    finally:
        os._exit(EXIT_PEER_LOST)


def _global_state() -> Any:
    from jax._src import distributed as jax_distributed  # private: guarded by every caller

    return jax_distributed.global_state


def _with_lost_peer_handler(initialize_fn) -> None:
    """Runs ``initialize_fn`` (a jax.distributed.initialize call) with ``_on_lost_peer`` given
    to jaxlib's client, where the client takes it; otherwise as it is."""
    try:
        from jax._src import distributed as jax_distributed

        lib = jax_distributed._jax
        make_client = lib.get_distributed_runtime_client
        takes_callback = 'missed_heartbeat_callback' in (make_client.__doc__ or '')
    except (ImportError, AttributeError):
        takes_callback = False
    if not takes_callback:
        initialize_fn()
        return

    def make_client_with_callback(*args, **kwargs):
        kwargs.setdefault('missed_heartbeat_callback', _on_lost_peer)
        return make_client(*args, **kwargs)

    lib.get_distributed_runtime_client = make_client_with_callback
    try:
        initialize_fn()
    finally:
        lib.get_distributed_runtime_client = make_client
    _state['handler'] = True


def wait_for_lost_peer() -> None:
    """After an error in a multi-process run: if a peer died, the coordination service says so
    within the heartbeat timeout and ``_on_lost_peer`` ends this process naming it; wait that
    long (sleeping, so that the callback can run). Returns when no peer was lost (the error is
    this process's own), or at once in a single-process run or without the handler."""
    if jax.process_count() == 1 or not _state['handler']:
        return
    deadline = time.monotonic() + 2 * _state['heartbeat_timeout_s'] + 5
    while time.monotonic() < deadline:
        time.sleep(0.5)
