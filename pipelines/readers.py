"""Input discovery and the validate stage: files → records (source, line, text) or quarantine reasons.

Formats: jsonl (`{"id"?, "text"}` per line; `.json` holding one array of such objects, or
pretty-printed objects, also works), parquet and Arrow IPC (Hugging Face `save_to_disk`, Feather;
a `text` column), CSV / TSV with a header row (a `text` column) and plain text (one document per
file, UTF-8 or UTF-16 with its byte-order mark); any of them compressed (gzip, zstd, bz2, xz, told
by the first bytes). The key / column of the text is `text_key` ("text"). An unknown suffix is
sniffed from the first bytes. Nothing here raises on bad content: every line or row read becomes
one record, either with its text or with a quarantine reason; a file that cannot be read at all
(permissions, corrupt parquet footer, binary, a FIFO or device) becomes one quarantined record.
"""

from __future__ import annotations

import bz2
import codecs
import glob
import gzip
import io
import json
import lzma
import os
import re
import stat
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dsv3ray.errors import UserError

OK, DROP, QUARANTINE = 0, 1, 2  # record status codes
EXCERPT_CHARS = 200

_JSONL = {".jsonl", ".ndjson", ".json"}
_CSV = {".csv": ",", ".tsv": "\t"}
_ARROW = {".arrow", ".feather", ".ipc"}
_TEXT = {".txt", ".text", ".md", ".rst"}
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_SPACE = re.compile(r"[ \t\r\n]*")  # JSON's whitespace


def expand_inputs(inputs: list[str], skip: Path | None = None) -> list[Path]:
    """Files, directories (walked recursively, hidden entries skipped) and glob patterns → sorted
    files. `skip`: a directory that walks and globs leave out (prepare's --output inside an input
    directory: an earlier run's shards and reports are no input); what is named outright is kept."""
    if not inputs:
        raise UserError("prepare: no input given: pass --input FILE_OR_DIR_OR_GLOB ...")
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise UserError(f"prepare: input pattern {item!r} matches no file: check the path")
            for m in matches:  # (a glob never reaches into `skip`)
                if not _under(m, skip):
                    files.extend(_walk(m, skip) if m.is_dir() else [m])
        elif p.is_dir():
            files.extend(_walk(p, skip))
        elif p.exists():
            files.append(p)
        else:
            raise UserError(
                f"prepare: input {item!r} does not exist: pass an existing file, directory or glob"
            )
    seen, out = set(), []
    for f in files:
        key = os.path.realpath(f)  # (one file reached by two paths, through a link, is read once)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def _under(path: Path, root: Path | None) -> bool:
    if root is None:
        return False
    real, top = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    return real == top or top in real.parents


def _walk(root: Path, skip: Path | None = None) -> list[Path]:
    """Files under root, `skip` pruned where the walk meets it; linked directories are followed
    (data trees often link shards in from other disks), each real directory once, so a link loop
    ends."""
    out, visited = [], {os.path.realpath(root)}
    if skip is not None:
        visited.add(os.path.realpath(skip))
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, d))
            if not d.startswith(".") and real not in visited:
                visited.add(real)
                keep.append(d)
        dirnames[:] = keep
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return out


def _not_regular(path: Path) -> str | None:
    """What a path that exists but holds no file content is (a FIFO would block the read forever)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None  # (missing or unreadable: the open reports it)
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):  # fmt: skip
        if test(mode):
            return kind
    return None


# compressed inputs, told by their first bytes (LM corpora ship as .jsonl.gz, .jsonl.zst, ...)
_CODECS = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
_COMPRESSED_SUFFIXES = {".gz", ".zst", ".zstd", ".bz2", ".xz"}


def _codec(head: bytes) -> str | None:
    return next((name for magic, name in _CODECS.items() if head.startswith(magic)), None)


def _decompressed(f, codec: str | None) -> io.BufferedIOBase:
    """A buffered reader of f's content (f itself when it is not compressed)."""
    if codec == "gzip":
        return gzip.GzipFile(fileobj=f)
    if codec == "zstd":  # (pyarrow's codec: no zstandard package needed)
        return io.BufferedReader(pa.CompressedInputStream(pa.PythonFile(f, mode="r"), "zstd"))
    if codec == "bz2":
        return bz2.BZ2File(f)
    if codec == "xz":
        return lzma.LZMAFile(f)
    return f


def _guarded(rows: Iterator[tuple], src: str, codec: str | None) -> Iterator[tuple]:
    """The rows of one file; when it is compressed, a decompression error (a truncated or corrupt
    stream) ends them with one quarantined row on the line after the last one read."""
    last = 0
    try:
        for row in rows:
            last = row[1]
            yield row
    except (EOFError, OSError, zlib.error, lzma.LZMAError) as e:
        if codec is None:
            raise
        yield (src, last + 1, QUARANTINE, f"truncated_or_corrupt_{codec}", str(e)[:EXCERPT_CHARS], None)


def detect_format(path: Path, head: bytes) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    suffix = suffixes[-1] if suffixes else ""
    if suffix == ".parquet" or head.startswith(b"PAR1"):
        return "parquet"
    if suffix in _CSV:
        return suffix[1:]
    if suffix in _ARROW or head.startswith((b"ARROW1", b"\xff\xff\xff\xff")):
        return "arrow"
    if suffix in _JSONL:
        return "jsonl"
    if suffix in _TEXT or head.startswith(_UTF16_BOMS):
        return "text"
    if b"\x00" in head:
        return "binary"
    return "jsonl" if head.lstrip().startswith((b"{", b"[")) else "text"


def plan_work(files: list[Path], split_bytes: int) -> list[dict]:
    """Work items {path, start, end}: whole files, except plain (uncompressed) jsonl files larger
    than `split_bytes`, which are cut into byte ranges at line starts so that one big file is read
    and cleaned by many workers. Only the bytes around each cut are read here (a scan of the whole
    file to count lines cost the driver ~0.5 s per GB from the page cache, before any worker
    started): a range's reader numbers its lines from 1, and `SplitLines` gives a split file's rows
    their line numbers."""
    items = []
    for f in files:
        whole = {"path": str(f), "start": 0, "end": -1}
        try:
            size = f.stat().st_size
            if size <= split_bytes:
                items.append(whole)
                continue
            with open(f, "rb") as fh:
                head = fh.read(8192)
                if _codec(head) is not None or detect_format(f, head) != "jsonl" or _json_kind(head):
                    items.append(whole)
                    continue
                items.extend(_split_jsonl(fh, str(f), size, split_bytes))
        except OSError:
            items.append(whole)  # read_records reports it as unreadable
    return items


def group_work(items: list[dict], target_bytes: int, max_files: int = 4096) -> list[dict]:
    """plan_work's items packed into tasks {"parts": [item, ...]}: consecutive whole files smaller
    than `target_bytes` share a task until their bytes reach it (or `max_files`); a cut range or a
    large file is a task of its own. A corpus of one small document per file otherwise paid a
    task, an actor call and a cleaning batch per file (1,614 stdlib docs as .txt files: clean pass
    15.4 s vs 1.7 s as one jsonl)."""
    tasks: list[dict] = []
    parts: list[dict] = []
    size = 0
    for it in items:
        whole = it["start"] == 0 and it["end"] < 0
        try:
            nbytes = os.stat(it["path"]).st_size if whole else target_bytes
        except OSError:
            nbytes = 0  # (its reader reports it)
        if nbytes >= target_bytes:
            tasks.append({"parts": [it]})
            continue
        parts.append(it)
        size += nbytes
        if size >= target_bytes or len(parts) >= max_files:
            tasks.append({"parts": parts})
            parts, size = [], 0
    if parts:
        tasks.append({"parts": parts})
    return tasks


def _split_jsonl(fh, path: str, size: int, split_bytes: int) -> list[dict]:
    """The file's byte ranges of about split_bytes each, cut at line starts: a seek and a short read
    per cut. Nothing before a cut is read: a range's reader numbers its lines from 1, and the
    driver numbers a split file's lines by counting its rows (one per line, in input order)."""
    starts = [0]
    target = split_bytes
    while target < size:
        pos = target - 1  # (the cut is the first line start at or after target)
        fh.seek(pos)
        while True:
            chunk = fh.read(1 << 16)
            if not chunk:
                pos = size
                break
            nl = chunk.find(b"\n")
            if nl >= 0:
                pos += nl + 1
                break
            pos += len(chunk)
        if pos >= size:
            break
        starts.append(pos)
        target = pos + split_bytes
    ends = starts[1:] + [-1]
    return [{"path": path, "start": a, "end": b} for a, b in zip(starts, ends)]


class SplitLines:
    """The line numbers of the rows of jsonl files read in byte ranges (plan_work's items): every
    line of a range is one row (a record, a blank or oversized line, a malformed one) and rows
    reach the driver in input order, so a split file's k-th row is its line k. `of(table)` gives
    each row of the next table (reader rows' columns `source`, `line`) its line in its file; other
    files' rows keep the line their reader gave."""

    def __init__(self, items: list[dict]):
        self.rows = {it["path"]: 0 for it in items if it["start"] > 0 or it["end"] >= 0}

    def of(self, table: pa.Table) -> np.ndarray:
        line = table.column("line").to_numpy()
        if not self.rows:
            return line
        source = table.column("source")
        out = line
        for path in pc.unique(source).to_pylist():  # (a table's rows come from one file or a few)
            if path in self.rows:
                at = np.flatnonzero(pc.equal(source, path).to_numpy(zero_copy_only=False))
                out = out.copy() if out is line else out
                out[at] = self.rows[path] + np.arange(1, at.size + 1)
                self.rows[path] += at.size
        return out


def read_records(
    path: str | Path,
    max_record_bytes: int,
    start: int = 0,
    end: int = -1,
    text_key: str = "text",
) -> Iterator[tuple]:
    """Yield (source, line, status, reason, excerpt, text) for every record of one file, or of
    the byte range [start, end) of a plain jsonl file (see plan_work; its lines numbered from 1)."""
    path = Path(path)
    src = str(path)
    kind = _not_regular(path)
    if kind is not None:
        yield (src, 0, QUARANTINE, "not_a_regular_file", f"{kind}, not a file", None)
        return
    if start or end >= 0:
        try:
            with open(path, "rb") as f:
                f.seek(start)
                yield from _read_jsonl(f, src, max_record_bytes, end=end, key=text_key, whole=False)
        except OSError as e:
            yield (src, 1, QUARANTINE, "unreadable_file", str(e), None)
        return
    try:
        with open(path, "rb") as raw:
            codec = _codec(raw.peek(8)[:8])
            with _decompressed(raw, codec) as f:
                try:
                    head = f.peek(8192)[:8192]
                except (OSError, EOFError, zlib.error, lzma.LZMAError):
                    head = b""
                fmt = detect_format(path, head)
                if fmt == "parquet":
                    yield from _read_parquet(path, src, text_key)
                elif fmt == "binary":
                    yield (src, 1, QUARANTINE, "binary_file", _excerpt(head), None)
                elif fmt == "jsonl":
                    rows = _read_jsonl(f, src, max_record_bytes, key=text_key, blocks=codec is None)
                    yield from _guarded(rows, src, codec)
                elif fmt == "arrow":
                    yield from _read_arrow(path, f, src, text_key)
                elif fmt in ("csv", "tsv"):
                    rows = _read_csv(f, src, max_record_bytes, text_key, _CSV["." + fmt])
                    yield from _guarded(rows, src, codec)
                else:
                    yield from _guarded(_read_text(f, src, max_record_bytes), src, codec)
    except PermissionError as e:
        yield (src, 0, QUARANTINE, "unreadable_file", str(e.strerror), None)
    except IsADirectoryError:
        return
    except OSError as e:
        yield (src, 0, QUARANTINE, "unreadable_file", str(e), None)


def _excerpt(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        raw = raw[: EXCERPT_CHARS * 4].decode("utf-8", errors="backslashreplace")
    return raw[:EXCERPT_CHARS]


def _readline_bounded(f, limit: int) -> tuple[bytes, bool]:
    """One line of at most `limit` bytes; a longer one is consumed in chunks and reported oversized."""
    line = f.readline(limit + 1)
    if len(line) <= limit or line.endswith(b"\n"):
        return line, False
    head = line
    while line and not line.endswith(b"\n"):
        line = f.readline(1 << 20)
    return head[:EXCERPT_CHARS], True


def _json_kind(head: bytes) -> str | None:
    """ "array" for a file holding one JSON array (a .json export), "values" for pretty-printed
    objects (a lone "{" is no jsonl record), None for jsonl; from the file's first bytes."""
    head = head.lstrip()
    if head.startswith(b"["):
        return "array"
    if head.split(b"\n", 1)[0].strip() == b"{":
        return "values"
    return None


def _read_jsonl(
    f, src: str, max_bytes: int, end: int = -1, key: str = "text", whole: bool = True, blocks: bool = True
) -> Iterator[tuple]:
    """Rows of a jsonl file, or of a byte range of one (whole=False: never taken for JSON, even the
    last range, which reads to the end), lines numbered from 1; `blocks`: f is a plain file (read
    a block at a time), else a decompressed stream (read a line at a time)."""
    lineno = 0
    if whole:  # is it JSON rather than jsonl?
        kind = _json_kind(f.peek(8192)[:8192])
        if kind is not None:  # (streamed: its first line may be the whole file)
            yield from _read_json_stream(f, src, max_bytes, key, array=kind == "array")
            return
    loads, bad_json = orjson.loads, orjson.JSONDecodeError
    # a block at a time from a plain file; a line at a time from a decompressed stream (a corrupt
    # one's error loses the block being read: its lines before the damage are still yielded)
    for lines in _line_blocks(f, max_bytes, end) if blocks else _lines_one_by_one(f, max_bytes):
        for raw in lines:  # (inline: the common record is one orjson call and two type checks)
            lineno += 1
            if raw.__class__ is _Oversized:
                yield (src, lineno, QUARANTINE, "record_too_large", _excerpt(raw.head), None)
                continue
            if raw.isspace():
                yield (src, lineno, DROP, "blank_line", "", None)
                continue
            try:
                obj = loads(raw)
            except bad_json:
                yield _parse_json_record_json(raw, src, lineno, key)
                continue
            text = obj.get(key) if obj.__class__ is dict else None
            if text.__class__ is str:  # (orjson refuses lone surrogates: no check needed)
                yield (src, lineno, OK, "", "", text)
            else:
                yield _record_from_obj(obj, src, lineno, raw, key, surrogates=False)


def _lines_one_by_one(f, max_bytes: int) -> Iterator[list]:
    """_line_blocks' lines, one list each, by _readline_bounded (to the stream's end)."""
    while True:
        raw, oversized = _readline_bounded(f, max_bytes)
        if not raw:
            return
        yield [_Oversized(raw) if oversized else raw]


class _Oversized:
    """A line over the record limit, skipped: its first bytes, for the quarantine's excerpt."""

    def __init__(self, head: bytes):
        self.head = head


_LINE_BLOCK = 4 << 20  # bytes read at a time


def _line_blocks(f, max_bytes: int, end: int = -1) -> Iterator[list]:
    """The lines of f from its position (each with its newline; the stream's last may have none)
    in lists, read a block at a time: to the first line that starts at or past byte `end` (-1:
    the end). A line of more than max_bytes before its newline comes as an _Oversized of its
    first bytes (_readline_bounded's excerpt) and is read past in pieces, as that does: memory
    holds a block and at most max_bytes + 1 bytes of a line, however long the line."""
    pos = f.tell() if end >= 0 else 0
    while end < 0 or pos < end:
        block = f.read(_LINE_BLOCK if end < 0 else min(_LINE_BLOCK, end - pos))
        if not block:
            return
        pos += len(block)
        lines = block.split(b"\n")
        last = lines.pop()  # (b"": the block ends a line)
        cut = min(max_bytes + 1, EXCERPT_CHARS)  # (an oversized line keeps what its excerpt shows)
        out = [line + b"\n" if len(line) <= max_bytes else _Oversized(line[:cut]) for line in lines]
        if last:  # a line cut by the block's end (it started before `end`): its first bytes, read on
            head = (
                last + f.readline(max_bytes + 1 - len(last))
                if len(last) <= max_bytes
                else last[: max_bytes + 1]
            )
            if len(head) <= max_bytes or head.endswith(b"\n"):
                out.append(head)
            else:
                piece = head
                while piece and not piece.endswith(b"\n"):
                    piece = f.readline(1 << 20)
                out.append(_Oversized(head[:cut]))
            if end >= 0:
                pos = f.tell()
        yield out


def _parse_json_record(raw: bytes, src: str, lineno: int, key: str = "text") -> tuple:
    """One jsonl line → a reader row. orjson parses the bytes (and checks their UTF-8) ~3x faster
    than decode + json.loads; whatever orjson refuses (malformed, invalid UTF-8, and what only
    Python's json accepts: NaN, 1e500, lone surrogate escapes, integers over 64 bits, nesting over
    1024) goes through the json path, so every line gets the same outcome as with json alone."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _parse_json_record_json(raw, src, lineno, key)
    return _record_from_obj(obj, src, lineno, raw, key, surrogates=False)  # (orjson refuses lone ones)


def _parse_json_record_json(raw: bytes, src: str, lineno: int, key: str = "text") -> tuple:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return (src, lineno, QUARANTINE, "invalid_utf8", _excerpt(raw), None)
    try:
        obj = json.loads(line)
    except RecursionError:
        return (src, lineno, QUARANTINE, "json_too_deep", _excerpt(line), None)
    except ValueError:
        return (src, lineno, QUARANTINE, "malformed_json", _excerpt(line), None)
    return _record_from_obj(obj, src, lineno, line, key)


def _record_from_obj(
    obj, src: str, lineno: int, line: str | bytes, key: str = "text", surrogates: bool = True
) -> tuple:
    """`surrogates`: the parser may have let lone surrogates (\\ud800 escapes) into the text."""
    if not isinstance(obj, dict):
        return (src, lineno, QUARANTINE, "not_an_object", _excerpt(line), None)
    if obj.get(key) is None:
        return (src, lineno, QUARANTINE, "missing_text", _excerpt(line), None)
    text = obj[key]
    if not isinstance(text, str):
        return (src, lineno, QUARANTINE, "text_not_string", _excerpt(line), None)
    if surrogates and not text.isascii():
        try:
            text.encode("utf-8")  # lone surrogates from \ud800 escapes are not text
        except UnicodeEncodeError:
            return (src, lineno, QUARANTINE, "invalid_utf8", _excerpt(repr(text)), None)
    return (src, lineno, OK, "", "", text)


class _TooLarge(Exception):
    """One JSON value longer than max_record_bytes."""


class _JsonStream:
    """JSON values read from a file a chunk at a time: memory holds one value (plus a chunk), not
    the file, so a 10 GB JSON array is read like a jsonl file. `value()` decodes the value at the
    read position, reading on while the buffer ends inside it (chunks doubling, so a long value
    costs O(its size)); ValueError / RecursionError / UnicodeDecodeError for what does not decode,
    _TooLarge past max_bytes."""

    CHUNK = 1 << 20

    def __init__(self, f, max_bytes: int):
        self.f, self.max_bytes = f, max_bytes
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.text, self.pos, self.eof = "", 0, False
        self.line, self.counted = 1, 0  # the line number at text[counted]
        self.decoder, self.bad = json.JSONDecoder(), None

    def _more(self, size: int) -> bool:
        if self.eof:
            if self.bad is not None:  # the reading got to bytes that are not UTF-8
                raise self.bad
            return False
        chunk = self.f.read(size)
        self.eof = not chunk
        pending = self.utf8.getstate()[0]
        try:
            new = self.utf8.decode(chunk, final=self.eof)
        except UnicodeDecodeError as e:  # keep what comes before them; raise once it is read
            new = (pending + chunk)[: e.start].decode("utf-8")
            self.bad, self.eof = e, True
        self.line_here()  # (the consumed part goes)
        self.text = self.text[self.pos :] + new
        self.pos = self.counted = 0
        return True

    def peek(self) -> str | None:
        """The next character that is not JSON whitespace (None at the end), not consumed."""
        while True:
            self.pos = _SPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self._more(self.CHUNK):
                return None

    def take(self) -> None:
        self.pos += 1

    def value(self) -> tuple[int, object, str]:
        """(line it starts on, the value, its text)."""
        size = self.CHUNK
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.text, self.pos)
                if end < len(self.text) or self.eof:  # (a number at the buffer's end may go on)
                    if end - self.pos > self.max_bytes:  # (characters: bytes at least that many)
                        raise _TooLarge
                    line = self.line_here()
                    raw, self.pos = self.text[self.pos : end], end
                    return line, obj, raw
            except ValueError:
                if self.eof:
                    if self.bad is not None:
                        raise self.bad from None
                    raise
            if len(self.text) - self.pos > self.max_bytes:
                raise _TooLarge
            self._more(size)
            size *= 2

    def line_here(self) -> int:
        """The line of the read position (counted on from where the last call left off)."""
        self.line += self.text.count("\n", self.counted, self.pos)
        self.counted = self.pos
        return self.line

    def rest(self) -> str:
        return self.text[self.pos : self.pos + EXCERPT_CHARS]


def _read_json_stream(f, src: str, max_bytes: int, key: str, array: bool) -> Iterator[tuple]:
    """The records of a JSON file read as a stream: the elements of its top-level array (numbered
    by position, `array`), or values one after another (numbered by the line they start on:
    pretty-printed objects, once or concatenated). Where a value does not decode, the rest of the
    file is one quarantined record (nothing after it can be delimited)."""
    js = _JsonStream(f, max_bytes)
    i = 0

    def broken(reason: str, excerpt: str) -> tuple:
        return (src, i + 1 if array else js.line_here(), QUARANTINE, reason, excerpt, None)

    try:
        if array:
            js.peek()
            js.take()  # "["
        while True:
            c = js.peek()
            if array:
                if c == "]":
                    js.take()
                    if js.peek() is not None:
                        yield broken("malformed_json", js.rest())  # more after the array
                    return
                if i > 0:
                    if c != ",":
                        yield broken("malformed_json", js.rest())  # (None: the array never closes)
                        return
                    js.take()
                    js.peek()
                elif c is None:
                    yield broken("malformed_json", "")
                    return
            elif c is None:
                return
            line, obj, raw = js.value()
            i += 1
            yield _record_from_obj(obj, src, i if array else line, raw[: EXCERPT_CHARS * 4], key)
    except _TooLarge:
        yield broken("record_too_large", js.rest())
    except RecursionError:
        yield broken("json_too_deep", js.rest())
    except UnicodeDecodeError as e:
        yield broken("invalid_utf8", str(e)[:EXCERPT_CHARS])
    except ValueError:
        yield broken("malformed_json", js.rest())


def _read_csv(f, src: str, max_bytes: int, key: str, delimiter: str) -> Iterator[tuple]:
    """CSV / TSV with a header row: the `key` column's cell of each row is a record (quoted cells
    may hold newlines), numbered by row; read in blocks by pyarrow, the cells as bytes so that bad
    UTF-8 is one row's outcome, not the block's."""
    import pyarrow.csv as pcsv

    row = 0
    try:
        reader = pcsv.open_csv(
            f,
            read_options=pcsv.ReadOptions(block_size=16 << 20),  # (a row must fit in one block)
            parse_options=pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(include_columns=[key], column_types={key: pa.large_binary()}),
        )
        for batch in reader:
            for cell in batch.column(0).to_pylist():
                row += 1
                if cell is None:
                    yield (src, row, QUARANTINE, "missing_text", "", None)
                elif len(cell) > max_bytes:
                    yield (src, row, QUARANTINE, "record_too_large", _excerpt(cell), None)
                else:
                    try:
                        yield (src, row, OK, "", "", cell.decode("utf-8"))
                    except UnicodeDecodeError:
                        yield (src, row, QUARANTINE, "invalid_utf8", _excerpt(cell), None)
    except KeyError:  # (pyarrow's ArrowKeyError: no such column in the header)
        yield (src, 1, QUARANTINE, "missing_text", f"no column {key!r} in the header"[:EXCERPT_CHARS], None)
    except pa.ArrowInvalid as e:  # a row pyarrow cannot parse: where it breaks, the rest goes
        yield (src, row + 1, QUARANTINE, "malformed_csv", str(e)[:EXCERPT_CHARS], None)


def _read_text(f, src: str, max_bytes: int) -> Iterator[tuple]:
    raw = f.read(max_bytes + 1)
    if not raw:
        return  # an empty file holds no record (listed under files.empty in the report)
    if len(raw) > max_bytes:
        yield (src, 1, QUARANTINE, "record_too_large", _excerpt(raw), None)
        return
    if raw.startswith(_UTF16_BOMS):  # UTF-16 text (Windows exports) says so in its first 2 bytes
        try:
            yield (src, 1, OK, "", "", raw.decode("utf-16"))
        except UnicodeDecodeError:
            yield (src, 1, QUARANTINE, "invalid_utf16", _excerpt(raw), None)
        return
    if b"\x00" in raw:
        yield (src, 1, QUARANTINE, "binary_file", _excerpt(raw), None)
        return
    try:
        text = raw.decode("utf-8-sig")  # (a UTF-8 byte-order mark is not text)
    except UnicodeDecodeError:
        yield (src, 1, QUARANTINE, "invalid_utf8", _excerpt(raw), None)
        return
    yield (src, 1, OK, "", "", text)


def _is_text_type(t: pa.DataType) -> bool:
    """Arrow's string types: plain, large, view (Polars, DuckDB), and dictionary-encoded strings
    (a pandas categorical column), whose values read back as str."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _unreadable(src: str, why: str) -> tuple:
    return (src, 0, QUARANTINE, "unreadable_file", why[:EXCERPT_CHARS], None)


def _read_parquet(path: Path, src: str, key: str = "text") -> Iterator[tuple]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        yield _unreadable(src, f"not a readable parquet file: {e}")
        return
    names = pf.schema_arrow.names
    if key not in names:
        for row in range(pf.metadata.num_rows):
            yield (src, row + 1, QUARANTINE, "missing_text", f"columns: {names}"[:EXCERPT_CHARS], None)
        return
    batches = pf.iter_batches(columns=[key], batch_size=1024)
    yield from _column_rows(batches, src, pf.schema_arrow.field(key).type, "corrupt_parquet")


def _read_arrow(path: Path, f, src: str, key: str = "text") -> Iterator[tuple]:
    """Arrow IPC: the stream format (Hugging Face `save_to_disk`'s data-*.arrow) or the file format
    (Feather v2, "ARROW1"); the `key` column, one record per row."""
    try:
        if f.peek(6)[:6] == b"ARROW1":
            ipc = pa.ipc.open_file(path)
            schema, batches = ipc.schema, (ipc.get_batch(i) for i in range(ipc.num_record_batches))
        else:
            ipc = pa.ipc.open_stream(f)
            schema, batches = ipc.schema, iter(ipc)
    except (pa.ArrowException, OSError) as e:
        yield _unreadable(src, f"not a readable Arrow IPC file: {e}")
        return
    if key not in schema.names:
        yield (src, 1, QUARANTINE, "missing_text", f"columns: {schema.names}"[:EXCERPT_CHARS], None)
        return
    column = schema.get_field_index(key)
    yield from _column_rows((b.column(column) for b in batches), src, schema.field(key).type, "corrupt_arrow")


def _column_rows(batches, src: str, kind: pa.DataType, broken: str) -> Iterator[tuple]:
    """One record per value of a text column read in batches (arrays, or record batches of that
    one column); `broken`: the reason when reading stops part way."""
    is_string, row = _is_text_type(kind), 0
    try:
        for batch in batches:
            values = batch.column(0) if isinstance(batch, pa.RecordBatch) else batch
            for value in values.to_pylist():
                row += 1
                if value is None:
                    yield (src, row, QUARANTINE, "missing_text", "", None)
                elif not is_string or not isinstance(value, str):
                    yield (src, row, QUARANTINE, "text_not_string", _excerpt(repr(value)), None)
                else:
                    yield (src, row, OK, "", "", value)
    except (pa.ArrowException, OSError) as e:
        yield (src, row + 1, QUARANTINE, broken, str(e)[:EXCERPT_CHARS], None)


def read_files_rows(
    items: list[dict],
    max_record_bytes: int,
    batch_size: int,
    max_batch_bytes: int = 64 << 20,
    text_key: str = "text",
):
    """(rows, read seconds) of about `batch_size` records (fewer when the texts are large), the
    records of `items` (plan_work's) in order: a batch spans files when they are small;
    `text_key`: the JSON key / parquet column that holds a record's text."""
    rows, size = [], 0
    t0 = time.perf_counter()  # reading time only: the clock restarts when the consumer returns
    for item in items:
        for rec in read_records(item["path"], max_record_bytes, item["start"], item["end"], text_key):
            rows.append(rec)
            size += len(rec[5]) if rec[5] else 0
            if len(rows) >= batch_size or size >= max_batch_bytes:
                yield rows, time.perf_counter() - t0
                rows, size = [], 0
                t0 = time.perf_counter()
    if rows:
        yield rows, time.perf_counter() - t0
