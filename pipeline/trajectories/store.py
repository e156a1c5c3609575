"""The teacher trajectory store: one Zarr v3 store, one group per trajectory key (docs/trajectory-store.md).

Layout::

    STORE/zarr.json                      root group, attribute "sfd_trajectory_store" = format marker
    STORE/<key>/zarr.json                key group, attribute "sfd_trajectory_key" = description, chunk_size, ...
    STORE/<key>/x_T/                     [capacity, *S]         start noise x_T = t_max * z(seed)
    STORE/<key>/states/                  [capacity, N-1, *S]    teacher states at t_1..t_{N-1}
    STORE/<key>/labels/                  [capacity] int64       only when the label policy is not "none"
    (storage_dtype bfloat16: x_T and states hold the upper 16 bits of each float32, a uint16 array; read back
    as float32. Zarr v3 and numpy have no bfloat16 of their own.)
    STORE/<key>/commits/<c>.json         commit record of chunk c: seeds, xxh3 checksums and what the chunk cost

Row s holds seed s; chunk c holds seeds [c*chunk_size, (c+1)*chunk_size). A chunk is committed
only when its record exists, parses, and (when verified) the checksums match the decoded bytes
and every value is finite. Records are written last, one object per chunk, so a killed writer
leaves at most an uncommitted chunk and concurrent writers of different chunks never touch the
same object. A chunk holding a NaN or inf is never committed (:class:`NonFiniteTrajectoryError`).
A key is created by writing its group's ``zarr.json`` only if it does not exist yet (an atomic
exclusive create on local stores), so of two writers creating one key the second always reads the
first's description and chunk size and is refused when they differ. An OS error while writing
(no space, file too large, read-only) is a :class:`StoreError` naming the path and the cause.
The record also carries the chunk's generation cost (teacher forward images, wall seconds, device,
precision): the cost of a stored trajectory travels with it, whichever run generated it, and a
chunk regenerated after a kill is counted once (its earlier, uncommitted attempt left no record).
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.core.buffer import cpu, default_buffer_prototype
from zarr.core.sync import sync

from pipeline.core.files import os_error_message
from pipeline.core.hashing import hash_bytes
from pipeline.config.trajectories import COMPRESSORS
from pipeline.trajectories.spec import TrajectorySpec, diff, older_version_hint
from pipeline.core.param_checks import PipelineError

FORMAT = "sfd-trajectory-store"
FORMAT_VERSION = 1
ROOT_ATTR = "sfd_trajectory_store"
KEY_ATTR = "sfd_trajectory_key"
CAPACITY_SEEDS = 2**31  # rows are addressed by seed; unwritten chunks cost nothing
CHECKSUM = "xxh3_64 of the decoded array bytes (C order, little-endian)"
_RECORD_NAME = re.compile(r"^(\d+)\.json$")


ZARR_DTYPES = {"bfloat16": "uint16"}  # storage dtypes Zarr has no type for: their bit patterns


def to_storage(a: np.ndarray, storage_dtype: str) -> np.ndarray:
    """The array as stored: cast to the storage dtype; bfloat16 as the uint16 bits of torch's round-to-nearest-even."""
    if storage_dtype != "bfloat16":
        return np.asarray(a).astype(storage_dtype, copy=False)
    import torch

    bits = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(torch.bfloat16).view(torch.int16)
    return bits.numpy().view(np.uint16)


def from_storage(a: np.ndarray, storage_dtype: str) -> np.ndarray:
    """The stored array as floats: bfloat16 bits back to float32 (exact), others unchanged."""
    if storage_dtype != "bfloat16":
        return a
    return (np.asarray(a, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


class StoreError(PipelineError, RuntimeError):
    """The path is not a usable trajectory store (missing, another format, not writable)."""


class KeyMismatchError(StoreError):
    """The store holds no key matching what the caller expects; the message says what differs."""


class ChunkCorruptError(StoreError):
    """A committed chunk's bytes do not match its checksum record, cannot be decoded, or hold a NaN/inf."""

    def __init__(self, message: str, problem: str | None = None) -> None:
        super().__init__(message)
        self.problem = problem or message  # what is wrong, without where or what to do (sfd store verify's lines)


class NonFiniteTrajectoryError(StoreError):
    """Generated trajectories hold NaN or inf values; the chunk was not committed."""


def nonfinite_rows(data: Mapping[str, np.ndarray]) -> list[int]:
    """Row indices (within a chunk) where any floating-point array holds a NaN or inf."""
    bad: np.ndarray | None = None
    for a in data.values():
        a = np.asarray(a)
        if not np.issubdtype(a.dtype, np.floating):
            continue
        rows = ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
        bad = rows if bad is None else bad | rows
    return [] if bad is None else [int(i) for i in np.flatnonzero(bad)]


def _seed_list(seeds: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(map(str, seeds[:limit]))
    return shown + (f", ... ({len(seeds)} seeds)" if len(seeds) > limit else "")


def _is_url(path: str) -> bool:
    return "://" in path


def _check_writable_location(path: Path) -> None:
    ancestor = path
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if ancestor != path and not ancestor.is_dir():
        raise StoreError(f"cannot create the trajectory store {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise StoreError(f"cannot create the trajectory store {path}: {ancestor} is not writable")


def _check_local_format(path: Path) -> bool:
    """True when an SFD store exists at path, False when nothing (or an empty directory) is there."""
    if not path.exists():
        return False
    if not path.is_dir():
        raise StoreError(f"{path} is a file, not a trajectory store (a Zarr v3 directory)")
    if (path / "zarr.json").exists():
        return True
    if (path / ".zgroup").exists() or (path / ".zarray").exists():
        raise StoreError(f"{path} is a Zarr v2 store, not an SFD trajectory store ({FORMAT} v{FORMAT_VERSION}, Zarr v3)")
    if any(path.iterdir()):
        raise StoreError(f"{path} is a non-empty directory without zarr.json: not an SFD trajectory store")
    return False


def check_store_location(location: str | Path | Store) -> None:
    """Refuse a local path holding another format, or one that cannot be created; writes nothing."""
    if isinstance(location, (str, Path)) and not _is_url(str(location)):
        path = Path(location)
        if _check_local_format(path):
            open_store(path, mode="r")
        else:
            _check_writable_location(path)


def store_write_problem(location: str | Path | Store) -> str | None:
    """Why new chunks cannot be written to an existing local store (read-only, permission), or None.

    A temporary file is created in the store's root directory and removed. URLs and zarr Stores are not
    probed (None): a failing write there is still one line naming the path."""
    if not isinstance(location, (str, Path)) or _is_url(str(location)) or not Path(location).is_dir():
        return None
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix=".sfd-write-check-", dir=location)
    except OSError as e:
        return os_error_message(e, location)
    os.close(fd)
    os.unlink(name)
    return None


def make_compressors(name: str) -> list[Any]:
    from zarr.codecs import BloscCodec, ZstdCodec

    if name == "blosc-zstd":
        return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")]
    if name == "blosc-lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    if name == "zstd":
        return [ZstdCodec(level=3)]
    if name == "none":
        return []
    raise StoreError(f"compressor: got {name!r}; allowed values: {', '.join(map(repr, COMPRESSORS))}")


def checksum(array: np.ndarray) -> str:
    a = np.ascontiguousarray(array)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return hash_bytes(memoryview(a).cast("B"))


class TrajectoryStore:
    """A handle on a store (local path, fsspec URL or zarr Store); groups are opened lazily."""

    def __init__(self, root: zarr.Group, location: str) -> None:
        self.root = root
        self.location = location
        self._keys: dict[str, TrajectoryKey] = {}

    @property
    def store(self) -> Store:
        return self.root.store

    # --- keys -------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # commit records are not Zarr nodes
            names = [name for name, node in self.root.members() if isinstance(node, zarr.Group)]
        return sorted(n for n in names if KEY_ATTR in self.root[n].attrs)

    def resolve(self, key_or_prefix: str) -> str:
        """A full key from a key or an unambiguous prefix of one."""
        keys = self.keys()
        if key_or_prefix in keys:
            return key_or_prefix
        hits = [k for k in keys if k.startswith(key_or_prefix)]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise KeyMismatchError(f"{self.location}: no key {key_or_prefix!r}; keys: {', '.join(keys) or '(none)'}")
        raise KeyMismatchError(f"{self.location}: prefix {key_or_prefix!r} matches several keys: {', '.join(hits)}")

    def key(self, key: str) -> "TrajectoryKey":
        if key not in self._keys:
            group = self.root[key]
            if not isinstance(group, zarr.Group) or KEY_ATTR not in group.attrs:
                raise StoreError(f"{self.location}/{key} is not a trajectory key group")
            self._keys[key] = TrajectoryKey(self, key, group)
        return self._keys[key]

    def open_spec(self, spec: TrajectorySpec) -> "TrajectoryKey":
        """The key for this spec, or a KeyMismatchError naming what differs from the nearest key."""
        keys = self.keys()
        expected = spec.description()
        if spec.key in keys:
            handle = self.key(spec.key)
            differences = diff(expected, handle.description)
            if differences:
                raise KeyMismatchError(
                    f"{self.location}/{spec.key}: stored description does not match its key: " + "; ".join(differences)
                )
            return handle
        if not keys:
            raise KeyMismatchError(f"{self.location}: the store holds no trajectories (expected key {spec.key})")
        nearest = min(keys, key=lambda k: len(diff(expected, self.key(k).description)))
        found = self.key(nearest).description
        differences = diff(expected, found)
        raise KeyMismatchError(
            f"{self.location}: no trajectories for key {spec.key}. The nearest stored key {nearest} differs in: "
            + "; ".join(differences) + older_version_hint(found.get("spec_version"))
            + f". Stored keys: {', '.join(keys)}"
        )

    def create_key(self, spec: TrajectorySpec, *, chunk_size: int, compressor: str = "blosc-zstd") -> "TrajectoryKey":
        """Create the group and arrays for a spec, or return the existing ones after checking they agree.

        The group's ``zarr.json`` is written only if it does not exist (atomic on local and memory
        stores), then read back: whichever writer created the key, its description and chunk size are
        the key's, and a writer asking for another chunk size is refused (never silently given the
        other's chunking)."""
        key = spec.key
        if key not in self.keys():
            self._write_key_document(spec, chunk_size, compressor)
        self._keys.pop(key, None)
        handle = self.key(key)  # ours, or the one another writer created first
        if handle.chunk_size != chunk_size:
            raise StoreError(
                f"{self.location}/{key}: exists with chunk_size {handle.chunk_size}, asked for {chunk_size}; "
                f"use chunk_size {handle.chunk_size} (committed chunks are reused) or another store"
            )
        differences = diff(spec.description(), handle.description)
        if differences:
            raise KeyMismatchError(f"{self.location}/{key}: stored description differs: " + "; ".join(differences))
        self._create_arrays(spec, handle, chunk_size, compressor)
        self._keys.pop(key, None)
        handle = self.key(key)
        handle.check_arrays()
        return handle

    def _write_key_document(self, spec: TrajectorySpec, chunk_size: int, compressor: str) -> None:
        """The key group's zarr.json with its description, written only if none exists (the first writer wins)."""
        key = spec.key
        info = {
            "format_version": FORMAT_VERSION,
            "key": key,
            "description": spec.description(),
            "chunk_size": chunk_size,
            "capacity_seeds": CAPACITY_SEEDS,
            "compressor": compressor,
            "checksum": CHECKSUM,
            "arrays": ["x_T", "states"] + (["labels"] if spec.labelled else []),
        }
        from zarr.core.group import GroupMetadata

        document = GroupMetadata(attributes={KEY_ATTR: info}).to_buffer_dict(default_buffer_prototype())["zarr.json"]
        with self.writing(f"{key}/zarr.json"):
            sync(self.store.set_if_not_exists(f"{key}/zarr.json", document))

    def _create_arrays(self, spec: TrajectorySpec, handle: "TrajectoryKey", chunk_size: int, compressor: str) -> None:
        """The key's arrays and commits group, each unless it exists. They are (re)checked even for an existing
        key: a writer killed right after creating the group leaves a key without arrays."""
        key = spec.key
        group = handle.group
        compressor = handle.info.get("compressor", compressor)
        compressors = make_compressors(compressor)
        s = spec.sample_shape
        shapes = {
            "x_T": ((CAPACITY_SEEDS, *s), (chunk_size, *s), ZARR_DTYPES.get(spec.storage_dtype, spec.storage_dtype), compressors),
            "states": ((CAPACITY_SEEDS, spec.num_targets, *s), (chunk_size, spec.num_targets, *s),
                       ZARR_DTYPES.get(spec.storage_dtype, spec.storage_dtype), compressors),
        }
        if spec.labelled:
            shapes["labels"] = ((CAPACITY_SEEDS,), (chunk_size,), "int64", [])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            existing = {name for name, _ in group.members()}
        for name, (shape, chunks, dtype, comp) in shapes.items():
            if name in existing:
                continue
            try:
                with self.writing(f"{key}/{name}/zarr.json"):
                    group.create_array(
                        name, shape=shape, chunks=chunks, dtype=dtype, compressors=comp, fill_value=0,
                        config={"write_empty_chunks": True},
                    )  # fmt: skip
            except zarr.errors.ContainsArrayError:
                pass  # another writer created it first; same spec, same arrays
        if "commits" not in existing:
            try:
                with self.writing(f"{key}/commits/zarr.json"):
                    group.create_group("commits", attributes={"about": "one JSON commit record per chunk, written last"})
            except zarr.errors.ContainsGroupError:
                pass

    @contextmanager
    def writing(self, path: str) -> Iterator[None]:
        """An OS error while writing ``path`` (inside the store) becomes a one-line StoreError naming it."""
        try:
            yield
        except OSError as e:
            raise StoreError(os_error_message(e, f"{self.location}/{path}")) from e

    def delete_key(self, key: str) -> None:
        sync(self.store.delete_dir(key))
        self._keys.pop(key, None)


@dataclass
class ChunkProblem:
    key: str
    chunk: int
    problem: str

    def __str__(self) -> str:
        return f"{self.key} chunk {self.chunk}: {self.problem}"


class TrajectoryKey:
    """One trajectory key: its description, arrays and commit records."""

    def __init__(self, store: TrajectoryStore, key: str, group: zarr.Group) -> None:
        self.owner = store
        self.name = key
        self.group = group
        info = dict(group.attrs[KEY_ATTR])
        self.info: dict[str, Any] = info
        self.description: dict[str, Any] = info["description"]
        self.chunk_size: int = int(info["chunk_size"])
        self.array_names: list[str] = list(info["arrays"])
        self.storage_dtype: str = str(self.description.get("storage_dtype", "float32"))
        self._arrays: dict[str, zarr.Array] = {}

    @property
    def spec(self) -> TrajectorySpec:
        return TrajectorySpec.from_description(self.description)

    @property
    def labelled(self) -> bool:
        return "labels" in self.array_names

    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def check_arrays(self) -> None:
        """Refuse a key whose arrays are not chunked by its chunk_size (a store damaged by writers that raced
        to create the key with different chunk sizes, before key creation was atomic)."""
        for name in self.array_names:
            chunks = self.array(name).chunks[0]
            if chunks != self.chunk_size:
                raise StoreError(
                    f"{self.owner.location}/{self.name}: array {name} is chunked by {chunks} rows but the key records "
                    f"chunk_size {self.chunk_size}; the key is inconsistent: delete {self.owner.location}/{self.name} "
                    "and regenerate it"
                )

    def chunk_seeds(self, chunk: int) -> range:
        return range(chunk * self.chunk_size, (chunk + 1) * self.chunk_size)

    def chunks_for_seeds(self, seeds: list[int] | range) -> list[int]:
        return sorted({s // self.chunk_size for s in seeds})

    # --- commit records ---------------------------------------------------------------------
    def _record_path(self, chunk: int) -> str:
        return f"{self.name}/commits/{chunk}.json"

    def read_record(self, chunk: int) -> dict[str, Any] | None:
        """The chunk's commit record, or None when it is missing or unreadable (= not committed)."""
        buf = sync(self.owner.store.get(self._record_path(chunk), prototype=default_buffer_prototype()))
        if buf is None:
            return None
        try:
            record = json.loads(buf.to_bytes())
        except ValueError:
            return None
        if not isinstance(record, dict) or record.get("chunk") != chunk or not isinstance(record.get("checksums"), dict):
            return None
        return record

    def committed_chunks(self) -> list[int]:
        """Chunks whose commit record exists and parses (checksums are checked by verify/read)."""

        async def listing() -> list[str]:
            return [k async for k in self.owner.store.list_prefix(f"{self.name}/commits/")]

        chunks = []
        for path in sync(listing()):
            m = _RECORD_NAME.match(path.rsplit("/", 1)[-1])
            if m and self.read_record(int(m.group(1))) is not None:
                chunks.append(int(m.group(1)))
        return sorted(chunks)

    def committed_seeds(self) -> int:
        return len(self.committed_chunks()) * self.chunk_size

    def delete_record(self, chunk: int) -> None:
        with self.owner.writing(self._record_path(chunk)):
            sync(self.owner.store.delete(self._record_path(chunk)))

    def chunk_cost(self, chunk: int) -> dict[str, Any] | None:
        """What the committed chunk cost to generate (its record's ``cost``), or None: not committed, or
        committed by a writer older than cost records (unknown)."""
        record = self.read_record(chunk)
        cost = None if record is None else record.get("cost")
        return cost if isinstance(cost, dict) else None

    def stored_cost(self, seeds: Sequence[int] | None = None) -> dict[str, Any]:
        """The generation cost of the committed trajectories (all, or those among ``seeds``): each seed
        counted once at its chunk's per-trajectory cost. See :func:`trajectory_cost`."""
        return trajectory_cost(self, seeds)

    # --- chunk data -------------------------------------------------------------------------
    def write_chunk(self, chunk: int, data: Mapping[str, np.ndarray], *, cost: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Check that every value is finite, write a whole chunk's arrays, read them back, then commit: the record
        is written last.

        A NaN or inf anywhere raises :class:`NonFiniteTrajectoryError` naming the seeds before anything is
        written; an OS error (no space, file too large, read-only) a StoreError naming the path; in both
        cases the chunk stays uncommitted. ``cost`` (teacher_forward_images, wall_seconds, device,
        precision, ...) goes into the record, with the time spent writing and verifying the chunk added
        as ``write_seconds``."""
        start = time.perf_counter()
        if sorted(data) != sorted(self.array_names):
            raise StoreError(f"{self.name}: chunk data must hold {self.array_names}, got {sorted(data)}")
        rows = slice(chunk * self.chunk_size, (chunk + 1) * self.chunk_size)
        self.check_finite(chunk, data)
        expected = {}
        for name in self.array_names:
            arr = self.array(name)
            a = np.asarray(data[name]).astype(arr.dtype, copy=False) if name == "labels" else to_storage(data[name], self.storage_dtype)
            if a.shape != (self.chunk_size, *arr.shape[1:]):
                raise StoreError(f"{self.name}/{name}: chunk shape {a.shape}, expected {(self.chunk_size, *arr.shape[1:])}")
            if name != "labels" and a.dtype != np.asarray(data[name]).dtype:  # float16 storage can overflow to inf
                self.check_finite(chunk, {name: from_storage(a, self.storage_dtype)},
                                  why=f"{name} overflows the storage dtype {self.storage_dtype}")
            with self.owner.writing(f"{self.name}/{name} (chunk {chunk})"):
                arr[rows] = a
            expected[name] = checksum(a)
        for name in self.array_names:
            found = checksum(self.array(name)[rows])
            if found != expected[name]:
                raise ChunkCorruptError(f"{self.name} chunk {chunk}: {name} read back differs from what was written")
        record = {
            "chunk": chunk,
            "seeds": [rows.start, rows.stop],
            "checksums": expected,
            "algorithm": CHECKSUM,
        }
        if cost is not None:
            record["cost"] = {**dict(cost), "trajectories": self.chunk_size,
                              "write_seconds": round(time.perf_counter() - start, 4)}
        self._write_record(chunk, record)
        return record

    def check_finite(self, chunk: int, data: Mapping[str, np.ndarray], *, why: str = "non-finite teacher states",
                     teacher: str | None = None) -> None:
        """Raise :class:`NonFiniteTrajectoryError` naming the seeds of rows holding a NaN or inf (and the teacher:
        ``teacher`` where it came from, e.g. its checkpoint path, besides its hash)."""
        bad = nonfinite_rows(data)
        if bad:
            seeds = [chunk * self.chunk_size + i for i in bad]
            who = self.description.get("teacher_hash", "?") + (f" ({teacher})" if teacher else "")
            ckpt = f"--ckpt {teacher} " if teacher and Path(teacher).exists() else ""
            raise NonFiniteTrajectoryError(
                f"{why} (NaN or inf) for {len(bad)} of {self.chunk_size} seeds of chunk {chunk} (seeds {_seed_list(seeds)}) "
                f"of key {self.name} in {self.owner.location}, teacher {who}: "
                "nothing was committed for this chunk; check the teacher (NaN weights, or a class label that gives NaN: "
                f"`sfd sample {ckpt}--seeds {seeds[0]} --out /tmp/sfd-check` reproduces it)"
            )

    def _write_record(self, chunk: int, record: dict[str, Any]) -> None:
        payload = json.dumps(record, sort_keys=True, indent=1).encode()
        with self.owner.writing(self._record_path(chunk)):
            sync(self.owner.store.set(self._record_path(chunk), cpu.Buffer.from_bytes(payload)))

    def read_chunk(self, chunk: int, *, verify: bool = True) -> dict[str, np.ndarray]:
        """The committed chunk's arrays (decoded, storage dtype; bfloat16 as float32).

        With ``verify``, raises :class:`ChunkCorruptError` when a checksum does not match or a value is NaN/inf
        (a store written before commits checked finiteness)."""
        record = self.read_record(chunk)
        seeds = self.chunk_seeds(chunk)
        if record is None:
            raise StoreError(f"{self.owner.location}/{self.name}: chunk {chunk} (seeds {seeds.start}-{seeds.stop - 1}) "
                             "is not committed")  # fmt: skip
        rows = slice(chunk * self.chunk_size, (chunk + 1) * self.chunk_size)
        advice = (f"`sfd store verify --drop-bad {self.owner.location}` uncommits it and the trajectories stage "
                  "regenerates it")  # fmt: skip
        out = {}
        for name in self.array_names:
            try:
                out[name] = self.array(name)[rows]
            except Exception as e:  # a damaged object may fail to decode at all
                problem = f"{name} cannot be decoded ({type(e).__name__}: {e})".replace("\n", " ")
                raise ChunkCorruptError(f"{self.owner.location}/{self.name} chunk {chunk}: {problem}; {advice}",
                                        problem) from e  # fmt: skip
            if verify and checksum(out[name]) != record["checksums"].get(name):
                problem = f"{name} does not match its checksum (seeds {rows.start}-{rows.stop - 1})"
                raise ChunkCorruptError(f"{self.owner.location}/{self.name} chunk {chunk}: {problem}; {advice}", problem)
            if name != "labels":
                out[name] = from_storage(out[name], self.storage_dtype)  # checksums are of the stored bits
        if verify:
            bad = nonfinite_rows(out)
            if bad:
                problem = (f"non-finite values (NaN or inf) in {len(bad)} of {self.chunk_size} rows "
                           f"(seeds {_seed_list([rows.start + i for i in bad])})")  # fmt: skip
                raise ChunkCorruptError(f"{self.owner.location}/{self.name} chunk {chunk}: {problem}; {advice}", problem)
        return out

    def verify(self) -> tuple[int, list[ChunkProblem]]:
        """Check every committed chunk against its record and for NaN/inf: (number checked, problems)."""
        problems = []
        chunks = self.committed_chunks()
        for c in chunks:
            try:
                self.read_chunk(c, verify=True)
            except ChunkCorruptError as e:
                problems.append(ChunkProblem(self.name, c, e.problem))
        return len(chunks), problems

    def size_bytes(self) -> int:
        return int(sync(self.owner.store.getsize_prefix(f"{self.name}/")))


def open_store(
    location: str | Path | Store,
    *,
    mode: str = "r",  # "r": must exist; "a": open or create
    storage_options: dict[str, Any] | None = None,  # fsspec options for URLs
) -> TrajectoryStore:
    """Open (or with mode="a" create) a trajectory store at a local path, an fsspec URL or a zarr Store."""
    if mode not in ("r", "a"):
        raise ValueError(f"mode: got {mode!r}; allowed values: 'r', 'a'")
    label = str(location)
    zarr_mode = "r" if mode == "r" else "r+"
    kwargs: dict[str, Any] = {}
    if isinstance(location, (str, Path)) and not _is_url(str(location)):
        path = Path(location)
        exists = _check_local_format(path)
        if not exists:
            if mode == "r":
                raise StoreError(f"no trajectory store at {path} (generate it with the `trajectories` stage)")
            _check_writable_location(path)
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create the trajectory store {path}: {e}") from e
            return _create(str(path), label, {})
        target: Any = str(path)
    else:
        target = location
        if isinstance(location, str):
            opts = dict(storage_options or {})
            if location.startswith("file://"):
                opts.setdefault("auto_mkdir", True)
            kwargs["storage_options"] = opts
    try:
        root = zarr.open_group(target, mode=zarr_mode, **kwargs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        if mode == "r":
            raise StoreError(f"no trajectory store at {label} ({e})") from e
        return _create(target, label, kwargs)
    except (ValueError, zarr.errors.NodeTypeValidationError) as e:
        raise StoreError(f"{label} is not an SFD trajectory store ({e})") from e
    marker = root.attrs.get(ROOT_ATTR)
    if not isinstance(marker, dict) or marker.get("format") != FORMAT:
        raise StoreError(f"{label} is a Zarr store but not an SFD trajectory store (no {ROOT_ATTR!r} attribute)")
    if marker.get("version") != FORMAT_VERSION:
        raise StoreError(f"{label}: store format version {marker.get('version')}, this code reads {FORMAT_VERSION}")
    return TrajectoryStore(root, label)


def _create(target: Any, label: str, kwargs: dict[str, Any]) -> TrajectoryStore:
    attrs = {ROOT_ATTR: {"format": FORMAT, "version": FORMAT_VERSION}}
    try:
        root = zarr.open_group(target, mode="a", attributes=attrs, **kwargs)
    except OSError as e:
        raise StoreError(f"cannot create the trajectory store {label}: {e}") from e
    if ROOT_ATTR not in root.attrs:  # an empty group made by someone else
        raise StoreError(f"{label} is a Zarr store but not an SFD trajectory store (no {ROOT_ATTR!r} attribute)")
    return TrajectoryStore(root, label)


COST_COUNTS = ("teacher_forward_images", "wall_seconds")  # summed per trajectory in trajectory_cost


def trajectory_cost(key: TrajectoryKey, seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """Teacher cost of committed trajectories, from the chunks' commit records.

    Every seed (all committed ones, or the committed ones among ``seeds``) is counted once at its
    chunk's per-trajectory cost (the chunk's cost / its trajectories; wall seconds include the write).
    Chunks committed without a cost (a store written before cost records) are counted in
    ``unknown_trajectories``, never guessed. Returns {trajectories, teacher_forward_images,
    wall_seconds, unknown_trajectories, devices, precisions}.
    """
    committed = key.committed_chunks()
    per_chunk: dict[int, int]
    if seeds is None:
        per_chunk = {c: key.chunk_size for c in committed}
    else:
        per_chunk = {}
        done = set(committed)
        for s in set(int(s) for s in seeds):
            c = s // key.chunk_size
            if c in done:
                per_chunk[c] = per_chunk.get(c, 0) + 1
    totals = {"teacher_forward_images": 0.0, "wall_seconds": 0.0}
    known, unknown = 0, 0
    devices: set[str] = set()
    precisions: set[str] = set()
    for c, n in sorted(per_chunk.items()):
        cost = key.chunk_cost(c)
        if cost is None or not all(isinstance(cost.get(k), (int, float)) for k in COST_COUNTS):
            unknown += n
            continue
        size = int(cost.get("trajectories") or key.chunk_size)
        totals["teacher_forward_images"] += n * cost["teacher_forward_images"] / size
        totals["wall_seconds"] += n * (cost["wall_seconds"] + float(cost.get("write_seconds", 0.0))) / size
        known += n
        devices.add(str(cost.get("device")))
        precisions.add(str(cost.get("precision")))
    return {
        "trajectories": known + unknown,
        "teacher_forward_images": int(round(totals["teacher_forward_images"])),
        "wall_seconds": round(totals["wall_seconds"], 3),
        "unknown_trajectories": unknown,
        "devices": sorted(devices),
        "precisions": sorted(precisions),
    }


def sum_stored_costs(costs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several keys' :func:`pipeline.trajectories.store.trajectory_cost` results added up."""
    out: dict[str, Any] = {"trajectories": 0, "teacher_forward_images": 0, "wall_seconds": 0.0, "unknown_trajectories": 0,
                           "devices": [], "precisions": []}
    for c in costs:
        for k in ("trajectories", "teacher_forward_images", "unknown_trajectories"):
            out[k] += int(c.get(k, 0))
        out["wall_seconds"] = round(out["wall_seconds"] + float(c.get("wall_seconds", 0.0)), 3)
        out["devices"] = sorted(set(out["devices"]) | set(c.get("devices", [])))
        out["precisions"] = sorted(set(out["precisions"]) | set(c.get("precisions", [])))
    return out


def store_info(store: TrajectoryStore) -> list[dict[str, Any]]:
    """One entry per key: key, description, chunk size, committed chunks/seeds and bytes on disk."""
    from pipeline.diffusion.seeds import format_seeds

    out = []
    for key in store.keys():
        k = store.key(key)
        chunks = k.committed_chunks()
        seeds = [s for c in chunks for s in k.chunk_seeds(c)]
        out.append(
            {
                "key": key,
                "description": k.description,
                "chunk_size": k.chunk_size,
                "compressor": k.info.get("compressor"),
                "committed_chunks": len(chunks),
                "committed_seeds": format_seeds(seeds) if seeds else "",
                "num_seeds": len(seeds),
                "size_bytes": k.size_bytes(),
                "cost": trajectory_cost(k),
            }
        )
    return out


def verify_store(store: TrajectoryStore, *, drop_bad: bool = False) -> tuple[int, list[ChunkProblem]]:
    """Verify every committed chunk of every key (checksums, NaN/inf); with drop_bad, uncommit the bad chunks so
    the trajectories stage regenerates them.

    When a bad chunk cannot be uncommitted (a read-only store), a StoreError names every bad chunk and the cause."""
    checked, problems = 0, []
    for key in store.keys():
        n, bad = store.key(key).verify()
        checked += n
        problems += bad
    if drop_bad and problems:
        try:
            for p in problems:
                store.key(p.key).delete_record(p.chunk)
        except StoreError as e:
            named = ", ".join(f"{p.key} chunk {p.chunk} ({p.problem})" for p in problems)
            raise StoreError(f"{len(problems)} of {checked} committed chunks are bad and cannot be uncommitted: {named}; "
                             f"{e}") from e  # fmt: skip
    return checked, problems


def gc_store(store: TrajectoryStore, keep: list[str], *, dry_run: bool = False) -> list[str]:
    """Delete every key not in ``keep`` (full keys or unambiguous prefixes); returns the deleted keys."""
    if not keep:
        raise StoreError("gc: name at least one key to keep (--keep KEY); refusing to delete every key")
    kept = {store.resolve(k) for k in keep}
    doomed = [k for k in store.keys() if k not in kept]
    if not dry_run:
        for k in doomed:
            store.delete_key(k)
    return doomed
