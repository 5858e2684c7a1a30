"""Where training metrics go: TensorBoard event files, with whatever writer is installed.

clu's `SummaryWriter` needs TensorFlow, which only building a dataset requires. Without it, the
events are written with TensorBoard's own event-file writer (the `tensorboard` package, no
TensorFlow); without that too, metrics reach only the console. `create_writer` says which.
Every writer here has clu's `MetricWriter` methods that the loop uses: `write_scalars`,
`write_hparams`, `flush`, `close`.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Mapping
from typing import Any

from absl import logging


class NullWriter:
    """Writes nothing (processes other than 0, or no TensorBoard writer installed)."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        del step, scalars

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        del hparams

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class EventFileWriter(NullWriter):
    """Scalars as TensorBoard events, through the `tensorboard` package alone (no TensorFlow).

    Hyperparameters are not written as TensorBoard's hparams plugin data (that needs the plugin's
    protos and is rarely read); the run's config is logged at start instead.
    """

    def __init__(self, logdir: str):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer import event_file_writer

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        self._writer = event_file_writer.EventFileWriter(logdir)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        values = [
            self._summary.Value(tag=tag, simple_value=float(value))
            for tag, value in scalars.items()
        ]
        event = self._event(
            wall_time=time.time(), step=int(step), summary=self._summary(value=values)
        )
        self._writer.add_event(event)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def create_writer(logdir: str, *, write: bool = True):
    """The best available TensorBoard writer for `logdir` (a `NullWriter` when `write` is off).

    clu's asynchronous `SummaryWriter` when TensorFlow is installed, else TensorBoard's
    event-file writer, else nothing; logs which one it chose.
    """
    if not write:
        return NullWriter()
    if _installed("tensorflow") and _installed("clu"):
        from clu import metric_writers

        logging.info("TensorBoard events in %s (clu SummaryWriter).", logdir)
        return metric_writers.AsyncWriter(metric_writers.SummaryWriter(logdir))
    if _installed("tensorboard"):
        logging.info("TensorBoard events in %s (tensorboard's event-file writer).", logdir)
        return EventFileWriter(logdir)
    logging.warning(
        "No TensorBoard writer installed (tensorflow+clu or tensorboard): metrics go to the "
        "console only. `pip install tensorboard` writes them to %s.",
        logdir,
    )
    return NullWriter()
