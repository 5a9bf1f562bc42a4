"""Joining the other processes of a multi-process run, leaving promptly when one dies, and
stopping every process at the same step when the run is preempted (``Preemption``).

The processes run one program: every step's collectives and every checkpoint need all of them.
When one dies (``kill -9``, out of memory, a lost host) the others cannot go on. jax's
coordination service notices once the dead process has missed its heartbeats for
``heartbeat_timeout_seconds`` and ends every other process (SIGABRT, after a log line naming the
dead task: task i is process i). jax's default of 100 s let the survivors run on, blocked, for
54-98 s; ``initialize`` asks for ``HEARTBEAT_TIMEOUT_S`` (10 s) where this jax takes the argument
(looked up in ``jax.distributed.initialize``'s signature, so a jax without it still runs).

jaxlib's client also takes a ``missed_heartbeat_callback``, but jaxlib 0.10.2 cannot pass the
status to a Python callable (it terminates with ``std::bad_cast``), so the abort stays jax's.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import signal
import sys
import time
from typing import Any

import jax
from absl import logging

# Seconds without a heartbeat after which a process counts as dead. The heartbeats come from
# jax's own C++ threads, not from Python, so a long compilation or a busy host does not delay
# them; a lower value would end a run for a network hiccup of that length.
HEARTBEAT_TIMEOUT_S = 10
_state: dict[str, Any] = {'heartbeat_timeout_s': HEARTBEAT_TIMEOUT_S}


def timeout_kwargs(heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> dict[str, Any]:
    """The heartbeat keyword argument of ``jax.distributed.initialize``, where this jax has
    it (0.10.2 has it); {} otherwise."""
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
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            **timeouts,
        )
    elif os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('CLOUD_TPU_TASK_ID'):
        jax.distributed.initialize(**timeouts)  # GKE, or a launcher that exports the slice
    elif importlib.util.find_spec('libtpu') is not None:
        try:
            jax.distributed.initialize(**timeouts)
        except ValueError as e:  # jax's "coordinator_address should be defined": no TPU slice
            logging.info('no TPU slice found (%s): running as one process', e)


def wait_for_lost_peer(error: BaseException) -> None:
    """After a failed collective or barrier in a multi-process run: the usual cause is a dead
    peer, whose connection closed. Says so in one line, then waits (sleeping) for the
    coordination service, which names the dead process and ends this one within the heartbeat
    timeout. Returns when that does not happen (the error is this process's own), or at once in
    a single-process run."""
    if jax.process_count() == 1:
        return
    timeout = _state['heartbeat_timeout_s']
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    print(
        f'error: process {jax.process_index()} of {jax.process_count()}: a collective with the '
        f'other processes failed ({first}); another process has probably died. jax names it '
        f'and stops this process once it has missed heartbeats for {timeout} s. Restart every '
        'process with the same command: the run resumes from its last complete checkpoint.',
        file=sys.stderr,
        flush=True,
    )
    deadline = time.monotonic() + 2 * timeout + 5
    while time.monotonic() < deadline:
        time.sleep(0.5)


class Preemption:
    """SIGTERM -> save at the next step boundary, then return. Multi-process runs use jax's
    preemption sync point instead, so that every process stops at the same step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> Preemption:
        if jax.process_count() == 1:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread: no handler, no preemption saves
                self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            try:
                from jax.experimental import multihost_utils

                return multihost_utils.reached_preemption_sync_point(step)
            except Exception:  # noqa: BLE001 - no preemption service in this cluster
                return False
        return self.requested

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
