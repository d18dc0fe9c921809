"""Checkpoints written off the training thread.

The training thread copies the state's tensors into host buffers allocated once (pinned on CUDA,
copied without blocking) and goes on; a single writer thread serialises and stores them
(:func:`~faceops.train.checkpoint.save_checkpoint`: atomic, refuses NaN/Inf). The next checkpoint
first waits for the previous write, so a buffer is never overwritten while it is being written and
checkpoints land in order; :meth:`CheckpointWriter.wait` ends a run with every write done.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from faceops.train.checkpoint import NonFiniteCheckpointError, named_tensors, save_checkpoint

log = logging.getLogger(__name__)


class CheckpointWriter:
    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="faceops-checkpoint")
        self._pending: Future | None = None
        self._buffers: dict[str, torch.Tensor] = {}

    def _to_host(self, obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            buf = self._buffers.get(path)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                buf = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
                self._buffers[path] = buf
            buf.copy_(obj.detach(), non_blocking=obj.is_cuda)
            return buf
        if isinstance(obj, dict):
            return {k: self._to_host(v, f"{path}.{k}") for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return type(obj)(self._to_host(v, f"{path}[{i}]") for i, v in enumerate(obj))
        return copy.deepcopy(obj)

    def submit(self, state: dict, uri: str, copies: tuple[str, ...] = (),
               done: Callable[[], None] | None = None) -> None:
        """Write ``state`` to ``copies`` then ``uri`` in the background (``done`` runs after)."""
        self.wait()
        host = self._to_host(state, "")
        event = None
        device = next((t.device for _, t in named_tensors(state) if t.is_cuda), None)
        if device is not None:  # the copies were queued on that device's stream: wait for them there
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
        self._pending = self._pool.submit(self._write, host, uri, copies, event, done)

    @staticmethod
    def _write(state: dict, uri: str, copies: tuple[str, ...], event: Any, done: Callable[[], None] | None) -> None:
        if event is not None:
            event.synchronize()
        try:
            save_checkpoint(uri, state, copies)
        except NonFiniteCheckpointError as exc:
            log.error("%s (the previous checkpoint is kept)", exc)
            return
        if done is not None:
            done()

    def wait(self) -> None:
        """Block until the last write is stored; a failed write raises here."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
