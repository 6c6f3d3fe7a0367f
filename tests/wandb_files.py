"""A reader of the `.wandb` file that a W&B run writes, for the tests: wandb 0.31 ships none.

The file is a 7-byte header (b":W&B", magic 0xBEE1, version 0) and then LevelDB's log format: 32 KiB blocks
(the header counts towards the first) of chunks, each a 7-byte chunk header (CRC-32 of its type byte and
data, length, type) and data; a block's last bytes when fewer than 7 are zeros. A record is one FULL chunk,
or FIRST, MIDDLE..., LAST chunks, and holds one serialized wandb_internal_pb2.Record.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto.wandb_internal_pb2 import Record

FILE_HEADER = struct.Struct("<4sHB")
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> Iterator[Record]:
    data = path.read_bytes()
    assert FILE_HEADER.unpack_from(data) == (b":W&B", 0xBEE1, 0), f"{path} is not a .wandb file"
    pos, chunks = FILE_HEADER.size, []
    while pos + CHUNK_HEADER.size <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER.size:  # a block's zero-filled tail
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        chunk = data[pos + CHUNK_HEADER.size: pos + CHUNK_HEADER.size + length]
        pos += CHUNK_HEADER.size + length
        if kind == 0 and length == 0:  # zero padding
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad checksum in {path} before byte {pos}"
        assert (kind in (FULL, FIRST)) == (not chunks), f"chunk of type {kind} out of order in {path}"
        chunks.append(chunk)
        if kind in (FULL, LAST):
            record = Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def run_file(run_dir: Path) -> Path:
    """The one .wandb file of an offline run's directory."""
    (path,) = run_dir.glob("run-*.wandb")
    return path


def history(run_dir: Path) -> list[dict[str, Any]]:
    """The rows the run logged, each {key: value} with nested keys joined by '/'."""
    return [{"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            for record in read_records(run_file(run_dir)) if record.WhichOneof("record_type") == "history"]


def run_info(run_dir: Path) -> Any:
    """The run record: its id, project, group, tags and config (config.update: key, value_json)."""
    (run,) = [r.run for r in read_records(run_file(run_dir)) if r.WhichOneof("record_type") == "run"]
    return run
