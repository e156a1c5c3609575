"""Streaming reader of one trajectory key: shuffled chunks, background prefetch, verified checksums.

The dataset holds only the store location and the expected spec/key; the store is opened in
``__iter__`` (lazily, so DataLoader workers each open their own handle) and every chunk is
checked against its commit record as it is read.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.trajectories.spec import TrajectorySpec
from pipeline.trajectories.store import KeyMismatchError, StoreError, TrajectoryKey, open_store


class TrajectoryBatch(NamedTuple):
    x_T: torch.Tensor  # [B, *S] float32, x_T = t_max * z
    states: torch.Tensor  # [B, N-1, *S] float32, teacher states at t_1..t_{N-1}
    labels: torch.Tensor | None  # [B] int64, None when unconditional
    seeds: torch.Tensor  # [B] int64


_DONE = object()


class TrajectoryDataset(IterableDataset):
    """Yields ready :class:`TrajectoryBatch` es (use ``DataLoader(ds, batch_size=None)``)."""

    def __init__(
        self,
        store: str | Path | Any,  # local path, fsspec URL or a zarr Store
        spec_or_key: TrajectorySpec | str,  # a spec (description checked) or a key / key prefix
        *,
        batch_size: int,
        seeds: Sequence[int] | None = None,  # None: every committed seed of the key
        shuffle_seed: int = 0,
        shuffle: bool = True,
        prefetch: int = 2,  # chunks decoded ahead by the background thread
        verify: bool = True,
        cycle: bool = False,  # endless: epoch after epoch, reshuffled (training by kimg)
        drop_last: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.location = store
        self.spec_or_key = spec_or_key
        self.batch_size = batch_size
        self.seeds = None if seeds is None else sorted(set(int(s) for s in seeds))
        self.shuffle_seed = shuffle_seed
        self.shuffle = shuffle
        self.prefetch = max(1, prefetch)
        self.verify = verify
        self.cycle = cycle
        self.drop_last = drop_last
        self.storage_options = storage_options
        self.epoch = 0
        self._key: TrajectoryKey | None = None
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_key"] = None  # workers reopen the store lazily
        return state

    def set_epoch(self, epoch: int) -> None:
        """Chunk and row order depend on (shuffle_seed, epoch) only."""
        self.epoch = int(epoch)

    def open(self) -> TrajectoryKey:
        if self._key is None or self._pid != os.getpid():  # a forked loader worker reopens its own handle
            self._pid = os.getpid()
            store = open_store(self.location, mode="r", storage_options=self.storage_options)
            if isinstance(self.spec_or_key, TrajectorySpec):
                self._key = store.open_spec(self.spec_or_key)
            else:
                self._key = store.key(store.resolve(self.spec_or_key))
        return self._key

    def chunks(self) -> list[int]:
        """The committed chunks this dataset reads; refuses seeds that are not committed."""
        key = self.open()
        committed = key.committed_chunks()
        if self.seeds is None:
            if not committed:
                raise StoreError(f"{self.location}/{key.name}: no committed chunks (run the trajectories stage)")
            return committed
        wanted = key.chunks_for_seeds(self.seeds)
        missing = sorted(set(wanted) - set(committed))
        if missing:
            ranges = ", ".join(f"{key.chunk_seeds(c).start}-{key.chunk_seeds(c).stop - 1}" for c in missing[:5])
            raise KeyMismatchError(
                f"{self.location}/{key.name}: seeds not generated yet (chunks {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"seeds {ranges}); run the trajectories stage with these seeds"
            )
        return wanted

    def __len__(self) -> int:
        """Batches per epoch (for one reader; split across workers when there are several)."""
        key = self.open()
        n = len(self.seeds) if self.seeds is not None else len(self.chunks()) * key.chunk_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _epoch_order(self, chunks: list[int], epoch: int) -> list[int]:
        if not self.shuffle:
            return list(chunks)
        rng = np.random.default_rng([self.shuffle_seed, epoch])
        return [chunks[i] for i in rng.permutation(len(chunks))]

    def _chunk_stream(self, stop: threading.Event, out: queue.Queue) -> None:
        """Background thread: read, verify and shuffle rows of chunks in epoch order."""
        try:
            key = self.open()
            chunks = self.chunks()
            info = get_worker_info()
            epoch = self.epoch
            wanted = None if self.seeds is None else np.asarray(self.seeds, dtype=np.int64)
            while not stop.is_set():
                order = self._epoch_order(chunks, epoch)
                if info is not None:
                    order = order[info.id :: info.num_workers]
                rng = np.random.default_rng([self.shuffle_seed, epoch, 1])
                for c in order:
                    data = key.read_chunk(c, verify=self.verify)
                    seeds = np.arange(c * key.chunk_size, (c + 1) * key.chunk_size, dtype=np.int64)
                    rows = np.arange(len(seeds)) if wanted is None else np.nonzero(np.isin(seeds, wanted))[0]
                    if self.shuffle:
                        rows = rng.permutation(rows)
                    full = wanted is None and not self.shuffle
                    item = {name: _as_float32(a if full else np.take(a, rows, axis=0)) for name, a in data.items()}
                    item["seeds"] = seeds if full else seeds[rows]
                    while not stop.is_set():
                        try:
                            out.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            pass
                    if stop.is_set():
                        return
                if not self.cycle:
                    break
                epoch += 1
            out.put(_DONE)
        except BaseException as e:  # handed to the consumer
            out.put(e)

    def __iter__(self) -> Iterator[TrajectoryBatch]:
        self.open()
        stop = threading.Event()
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        thread = threading.Thread(target=self._chunk_stream, args=(stop, out), name="trajectory-prefetch", daemon=True)
        thread.start()
        pending: list[dict[str, np.ndarray]] = []
        pending_rows = 0
        try:
            while True:
                item = out.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                pending.append(item)
                pending_rows += len(item["seeds"])
                while pending_rows >= self.batch_size:
                    batch, pending, pending_rows = _take(pending, self.batch_size)
                    yield _to_batch(batch)
            if pending_rows and not self.drop_last:
                batch, pending, pending_rows = _take(pending, pending_rows)
                yield _to_batch(batch)
        finally:
            stop.set()
            thread.join(timeout=5)


def _as_float32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if a.dtype == np.float16 else a


def _take(pending: list[dict[str, np.ndarray]], n: int) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]], int]:
    names = pending[0].keys()
    merged = {k: np.concatenate([p[k] for p in pending]) if len(pending) > 1 else pending[0][k] for k in names}
    batch = {k: v[:n] for k, v in merged.items()}
    rest = {k: v[n:] for k, v in merged.items()}
    left = len(rest["seeds"])
    return batch, ([rest] if left else []), left


def _to_batch(b: dict[str, np.ndarray]) -> TrajectoryBatch:
    labels = b.get("labels")
    return TrajectoryBatch(
        x_T=torch.from_numpy(np.ascontiguousarray(b["x_T"], dtype=np.float32)),
        states=torch.from_numpy(np.ascontiguousarray(b["states"], dtype=np.float32)),
        labels=None if labels is None else torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
        seeds=torch.from_numpy(np.ascontiguousarray(b["seeds"])),
    )
