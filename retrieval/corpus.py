"""Corpus readers: a directory tree (or one file) of text, source, JSON and Parquet files -> documents.

A plain file is one document. A JSON Lines line, an element of a JSON list (or a whole JSON
object) and a Parquet row are one document each, whose text is the selected fields joined
with a blank line. Files that cannot be used (empty, binary, not UTF-8, not parseable) are
skipped and counted in a ``SkipCounts``, never raised: one bad file must not sink a build of
thousands.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Collection, Iterator

TEXT_SUFFIXES = frozenset(
    ".txt .md .rst .py .c .h .cpp .js .ts .java .go .rs .sh .toml .yaml .yml .html .css".split()
)
RECORD_SUFFIXES = frozenset({".jsonl", ".json", ".parquet"})

# Fields tried, in this order, when the caller names none.
DEFAULT_FIELDS = (
    "text", "content", "question", "answer", "instruction", "input", "output",
    "prompt", "response", "completion", "conversations", "messages",
)
# Directory names left out of a walk: installed third-party code and caches are not the
# user's corpus (the Python stdlib directory holds site-packages, gigabytes of it).
DEFAULT_EXCLUDE = frozenset({"site-packages", "dist-packages", "node_modules", "__pycache__"})

_PARQUET_BATCH_ROWS = 4096


class EmptyCorpusError(ValueError):
    """The corpus yielded no document at all."""


@dataclass(frozen=True)
class Document:
    """One document of a corpus.

    path   the file it came from (absolute)
    index  record number within the file: JSONL line number (0-based), JSON list index or
           Parquet row; 0 for plain files and single-object JSON files
    text   its text (for records: the selected fields joined with a blank line)
    """

    path: str
    index: int
    text: str


@dataclass
class SkipCounts:
    """What a corpus walk left out, by reason (filled in while iterating).

    empty        files with no bytes or only whitespace
    binary       files holding a NUL byte
    undecodable  files, or JSON Lines lines, that are not UTF-8
    malformed    JSON/Parquet files, or JSON Lines lines, that do not parse
    no_text      records with none of the selected fields (or only empty ones)
    other_type   files whose suffix is not a supported one
    excluded     hidden files and directories, and directories named in ``exclude``
    """

    empty: int = 0
    binary: int = 0
    undecodable: int = 0
    malformed: int = 0
    no_text: int = 0
    other_type: int = 0
    excluded: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def total(self) -> int:
        return sum(asdict(self).values())


def iter_documents(
    root: str | os.PathLike,
    fields: list[str] | None = None,
    skipped: SkipCounts | None = None,
    exclude: Collection[str] = DEFAULT_EXCLUDE,
) -> Iterator[Document]:
    """Documents of the corpus at ``root`` (a directory or one file), in sorted path order.

    Reads files with suffixes in ``TEXT_SUFFIXES`` as plain UTF-8 text and ``RECORD_SUFFIXES``
    as records; a file given directly as ``root`` with another suffix is read as text.
    ``fields`` names the record fields that hold text (default: ``DEFAULT_FIELDS``, those
    present, in that order); a field may be a string, a number or a list of strings or of
    chat turns ({from/role, value/content}); a value equal to one already taken from the same
    record is not repeated. Hidden entries and directories named in ``exclude`` are not walked.
    Every file or record left out is counted in ``skipped`` (mutated as the walk goes, so the
    counts are final once the iterator is exhausted).
    Raises FileNotFoundError if ``root`` does not exist and EmptyCorpusError, after the walk,
    if it yielded no document.
    """
    skipped = SkipCounts() if skipped is None else skipped
    names = tuple(fields) if fields else DEFAULT_FIELDS
    count = 0
    root = Path(root).absolute()
    for path in corpus_files(root, skipped, exclude):
        for doc in file_documents(path, fields, skipped):
            count += 1
            yield doc
    if count == 0:
        reasons = ", ".join(f"{n} {k}" for k, n in skipped.as_dict().items() if n) or "no files"
        raise EmptyCorpusError(
            f"no documents in {root} (skipped: {reasons}); text files need one of the suffixes "
            f"{' '.join(sorted(TEXT_SUFFIXES | RECORD_SUFFIXES))}, records one of the fields "
            f"{', '.join(names)} (choose others with --field, or fields=)"
        )


def corpus_files(
    root: str | os.PathLike, skipped: SkipCounts | None = None, exclude: Collection[str] = DEFAULT_EXCLUDE
) -> Iterator[Path]:
    """The files ``iter_documents`` reads, in its order (absolute paths).

    A file given as ``root`` is yielded whatever its suffix; in a walk, files without a
    supported suffix are counted in ``skipped.other_type`` (and hidden or excluded entries in
    ``excluded``). Raises FileNotFoundError if ``root`` does not exist.
    """
    root = Path(root).absolute()
    if not root.exists():
        raise FileNotFoundError(f"no corpus at {root}: pass a directory or a file")
    if root.is_file():
        yield root
        return
    skipped = SkipCounts() if skipped is None else skipped
    for path in _walk(root, exclude, skipped):
        if path.suffix.lower() in TEXT_SUFFIXES | RECORD_SUFFIXES:
            yield path
        else:
            skipped.other_type += 1


def file_documents(path: Path, fields: list[str] | None = None, skipped: SkipCounts | None = None) -> Iterator[Document]:
    """The documents of one file from ``corpus_files``: records for .jsonl/.json/.parquet,
    else the whole file as text. What is left out is counted in ``skipped``; never raises
    for bad content (EmptyCorpusError is ``iter_documents``'s, over a whole corpus)."""
    skipped = SkipCounts() if skipped is None else skipped
    suffix = path.suffix.lower()
    if suffix in RECORD_SUFFIXES:
        return _records(path, suffix, tuple(fields) if fields else DEFAULT_FIELDS, skipped)
    return _text_file(path, skipped)


def _walk(top: Path, exclude: Collection[str], skipped: SkipCounts) -> Iterator[Path]:
    """Files under ``top`` in sorted path order (not os.walk's files-before-subdirectories)."""
    with os.scandir(top) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        # Like os.walk, symbolic links to directories are not followed (no cycles).
        is_dir = e.is_dir(follow_symlinks=False)
        if e.name.startswith(".") or (is_dir and e.name in exclude):
            skipped.excluded += 1
        elif is_dir:
            yield from _walk(Path(e.path), exclude, skipped)
        elif e.is_file():
            yield Path(e.path)


def _decode(data: bytes, skipped: SkipCounts) -> str | None:
    """Text of a whole file, or None (counted) if it is empty, binary or not UTF-8."""
    if b"\0" in data:
        skipped.binary += 1
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        skipped.undecodable += 1
        return None
    if not text.strip():
        skipped.empty += 1
        return None
    return text


def _text_file(path: Path, skipped: SkipCounts) -> Iterator[Document]:
    text = _decode(path.read_bytes(), skipped)
    if text is not None:
        yield Document(str(path), 0, text)


def _records(path: Path, suffix: str, names: tuple[str, ...], skipped: SkipCounts) -> Iterator[Document]:
    if suffix == ".parquet":
        rows = _parquet_rows(path, names, skipped)
    elif suffix == ".jsonl":
        rows = _jsonl_rows(path, skipped)
    else:
        rows = _json_rows(path, skipped)
    for i, record in rows:
        text = _record_text(record, names)
        if text:
            yield Document(str(path), i, text)
        else:
            skipped.no_text += 1


def _jsonl_rows(path: Path, skipped: SkipCounts) -> Iterator[tuple[int, object]]:
    with open(path, "rb") as f:
        head = f.read(1 << 13)
        if b"\0" in head:
            skipped.binary += 1
            return
        if not head.strip():
            skipped.empty += 1
            return
        f.seek(0)
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line.decode("utf-8-sig"))
            except UnicodeDecodeError:
                skipped.undecodable += 1
            except json.JSONDecodeError:
                skipped.malformed += 1


def _json_rows(path: Path, skipped: SkipCounts) -> Iterator[tuple[int, object]]:
    text = _decode(path.read_bytes(), skipped)
    if text is None:
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        skipped.malformed += 1
        return
    yield from enumerate(data) if isinstance(data, list) else [(0, data)]


def _parquet_rows(path: Path, names: tuple[str, ...], skipped: SkipCounts) -> Iterator[tuple[int, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.stat().st_size == 0:
        skipped.empty += 1
        return
    i = 0
    try:
        f = pq.ParquetFile(path)
        columns = [n for n in names if n in f.schema_arrow.names]
        if not columns:
            skipped.no_text += f.metadata.num_rows
            return
        # Only the text columns are read: a Parquet file may carry large unrelated ones.
        for batch in f.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
            for record in batch.to_pylist():
                yield i, record
                i += 1
    except (pa.ArrowException, OSError):
        skipped.malformed += 1


def _field_text(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [str(value)]
    if isinstance(value, list):
        out = []
        for item in value:
            turn = item.get("value", item.get("content")) if isinstance(item, dict) else item
            out.extend(_field_text(turn))
        return out
    return []


def _record_text(record: object, names: tuple[str, ...]) -> str:
    if isinstance(record, str):
        return record if record.strip() else ""
    if not isinstance(record, dict):
        return ""
    parts: list[str] = []
    for name in names:
        for part in _field_text(record.get(name)):
            if part.strip() and part not in parts:
                parts.append(part)
    return "\n\n".join(parts)
