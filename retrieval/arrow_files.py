"""The datastore's Arrow files: one-column IPC files, memory-mapped on open, with a CRC32 per block."""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from retrodraft.retrieval.errors import CorruptDatastoreError
from retrodraft.retrieval.layout import REBUILD

CRC_BLOCK = 1 << 25
ARROW = {"tokens": ("token", np.int32), "doc_offsets": ("offset", np.int64), "suffix_array": ("position", np.int64)}


def arrow_schema(name: str) -> pa.Schema:
    column, dtype = ARROW[name]
    return pa.schema([(column, pa.from_numpy_dtype(dtype))])


def block_crcs(bufs: list) -> list[list[int]]:
    """CRC32 of each CRC_BLOCK-byte block of each buffer, on all cores (crc32 drops the GIL)."""
    views = [memoryview(b) for b in bufs]
    jobs = [(i, v[s : s + CRC_BLOCK]) for i, v in enumerate(views) for s in range(0, len(v), CRC_BLOCK)]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        crcs = list(pool.map(lambda job: zlib.crc32(job[1]), jobs))
    out: list[list[int]] = [[] for _ in bufs]
    for (i, _), c in zip(jobs, crcs):
        out[i].append(c)
    return out


def map_arrays(path: Path, files: dict) -> dict[str, np.ndarray]:
    """Map each Arrow file, check size and CRCs against ``files``, return zero-copy arrays."""
    bufs = {}
    for name, want in files.items():
        f = path / f"{name}.arrow"
        size = f.stat().st_size if f.is_file() else None
        if size != want["bytes"]:
            raise CorruptDatastoreError(
                f"{f} is {'missing' if size is None else f'{size} bytes'}, expected {want['bytes']} bytes: "
                f"the datastore is damaged; {REBUILD.format(path)}"
            )
        with pa.memory_map(str(f)) as mm:
            bufs[name] = mm.read_buffer()
    for (name, buf), crcs in zip(bufs.items(), block_crcs(list(bufs.values()))):
        bad = [i for i, (a, b) in enumerate(zip(crcs, files[name]["crc32"])) if a != b]
        if bad:
            raise CorruptDatastoreError(
                f"{path / f'{name}.arrow'} fails its checksum at byte {bad[0] * CRC_BLOCK} "
                f"(block of {CRC_BLOCK} bytes): the datastore is damaged; {REBUILD.format(path)}"
            )
    arrays = {}
    for name, buf in bufs.items():
        reader = pa.ipc.open_file(buf)
        if reader.num_record_batches != 1 or reader.schema != arrow_schema(name):
            raise CorruptDatastoreError(f"{path / f'{name}.arrow'} has an unexpected layout; {REBUILD.format(path)}")
        arrays[name] = reader.get_batch(0).column(0).to_numpy(zero_copy_only=True)
    return arrays


def write_arrow(path: Path, name: str, array: np.ndarray) -> dict:
    """Write ``array`` as the one-column Arrow IPC file ``name``.arrow, fsync it, return its size and CRCs."""
    schema = arrow_schema(name)
    f = path / f"{name}.arrow"
    with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.record_batch([pa.array(array.astype(ARROW[name][1], copy=False))], schema=schema))
    fsync(f)
    with pa.memory_map(str(f)) as mm:
        buf = mm.read_buffer()
    return {"bytes": buf.size, "crc32": block_crcs([buf])[0]}


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

