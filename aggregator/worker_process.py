"""A worker process: its entry point (spawned by the supervisor) and the worker of its mode.

`worker_main` boots the worker, runs its loop and turns how it ended into the process's exit
code (protocol.py: 0, 1, FATAL_EXIT, FENCED_EXIT); `make_worker` picks `worker.Worker` or, in
cluster mode, its subclass `task_worker.TaskWorker`. This module sits above both, so neither
imports the other's variant.
"""

from __future__ import annotations

import logging
import os
import signal

import lmdb

from . import logs
from .config import Config
from .kafka_clients import redact_text
from .protocol import FATAL_EXIT, FENCED_EXIT
from .runtime import set_parent_death_signal, tune_gc
from .store import Fenced, ShardError, shard_path, storage_errno, storage_message
from .task_worker import TaskWorker
from .worker import Worker

log = logging.getLogger("aggregator.worker")


def make_worker(config: Config, index: int, prefix: str) -> Worker:
    """The worker for the config's mode (not booted)."""
    if config.cluster.enabled:
        return TaskWorker(config, index, prefix)
    return Worker(config, index, prefix)


def worker_main(config: Config, index: int, prefix: str, log_level: int,
                log_format: str = "text", errors=None) -> None:
    """Entry point of a worker process (spawned by the supervisor).

    An exception after boot is logged with its traceback and sent, as one line
    ("Type: message", secrets of the Kafka settings redacted), on `errors` (the send end of
    a pipe, if given): the supervisor stops the service when the same error ends a worker
    `service.max_worker_crashes` times in a row (supervisor._count_crash)."""
    set_parent_death_signal()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor coordinates shutdown
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    logs.setup(log_level, log_format, "worker", index)
    w = make_worker(config, index, prefix)
    try:
        w.boot()
    except ShardError as e:
        log.error("worker %d cannot start: %s", index, e)
        os._exit(FATAL_EXIT)
    except (lmdb.Error, OSError) as e:
        code = storage_errno(e)
        if code is None:
            raise
        path = getattr(e, "filename", None) or shard_path(config.service.data_dir, index)
        log.error("worker %d cannot start: %s", index, storage_message(code, path))
        os._exit(1)  # the supervisor tries again, service.max_boot_failures times
    tune_gc(between_batches=True)  # the worker collects between transactions
    try:
        code = w.run()
    except Fenced as e:
        # no cleanup: flushing the producers would publish for a shard this process no
        # longer owns
        log.error("worker %d fenced: superseded by epoch %d", index, e.epoch)
        os._exit(FENCED_EXIT)
    except ShardError as e:
        log.error("worker %d stopped: %s", index, e)
        code = FATAL_EXIT
    except Exception as e:  # noqa: BLE001 - reported to the supervisor, which respawns
        text = redact_text(f"{type(e).__name__}: {e}", config.kafka.producer_conf())
        text = redact_text(text, config.kafka.consumer_conf())[:500]
        log.exception("worker %d crashed: %s", index, text)
        if errors is not None:
            try:
                errors.send(text)
            except OSError:
                pass
        code = 1
    finally:
        try:
            w.close()
        except Exception:  # noqa: BLE001 - already on the way out
            log.exception("worker %d: closing after the crash failed", index)
    os._exit(code)
