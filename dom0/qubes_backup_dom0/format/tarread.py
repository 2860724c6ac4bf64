"""The strict inner-archive grammar (FORMAT.md sections 7-8): a push parser that accepts exactly what
tarwriter.py writes for the entries the manifest expects, and nothing else.

It knows the format and nothing of the filesystem.  What each entry becomes is a :class:`Destination`'s
business (extractor.py: files under a restore area, volume imports, or nothing in validate-only mode): the
reader calls it in entry order with already checked values.  Its input is already MAC-verified; this is the
second line of defence, so it trusts no structure: only ``expected`` entries (objects with ``path``,
``type``, ``size``, ``data``), in order, with exactly those sizes; bounded headers and sparse maps; no path
that escapes; canonical headers only.  Memory is bounded by one pax header or one sparse map (plus one small
record per path already seen, for the lexical conflict checks).  Any violation raises
:class:`VerificationError` (one line naming the entry).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any, Protocol

from qubes_backup_dom0.errors import VerificationError
from qubes_backup_dom0.format.tarspec import (
    BLOCK,
    DECIMAL,
    MAX_LINK,
    MAX_SPARSE_MAP,
    MAX_SPARSE_REGIONS,
    OCTAL11_LIMIT,
    PAX_DIR,
    PAX_KEYS,
    SIGNED_DECIMAL,
    TYPEFLAGS,
    ZEROS,
    is_sparse,
    pad,
    path_problem,
    sparse_name,
    split,
)


def _octal(field_: bytes, what: str) -> int:
    """A ustar numeric field: octal digits then NUL/space padding; base-256 and junk are refused."""
    digits = field_.rstrip(b"\0 ")
    if not digits or any(c not in b"01234567" for c in digits):
        raise VerificationError(f"inner archive: bad {what} field in tar header")
    return int(digits, 8)


def _decimal(value: bytes, what: str, signed: bool = False) -> int:
    if not (SIGNED_DECIMAL if signed else DECIMAL).fullmatch(value):
        raise VerificationError(f"inner archive: bad {what} value in pax header")
    return int(value)


def _parse_pax(data: bytes) -> dict[str, bytes]:
    """Strictly parse pax records; unknown or duplicate keys are refused."""
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        sp = data.find(b" ", pos, pos + 8)
        if sp < 0:
            raise VerificationError("inner archive: malformed pax record")
        n = _decimal(data[pos:sp], "pax record length")
        end = pos + n
        if end > len(data) or end <= sp + 2 or data[end - 1] != 0x0A:
            raise VerificationError("inner archive: malformed pax record")
        key, eq, value = data[sp + 1 : end - 1].partition(b"=")
        k = key.decode("ascii", "replace")
        if not eq or k not in PAX_KEYS:
            raise VerificationError(f"inner archive: pax key {k[:40]!r} not allowed")
        if k in out:
            raise VerificationError(f"inner archive: duplicate pax key {k!r}")
        out[k] = value
        pos = end
    return out


def _utf8(value: bytes, what: str) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise VerificationError(f"inner archive: {what} is not UTF-8") from None


def _canonical_ustar(name: bytes, mode: int, size: int, mtime: int, typeflag: bytes, linkname: bytes) -> bytes:
    """The one ustar header block FORMAT.md section 8 allows for these values (the reader's own statement of
    it, independent of the writer's ``_ustar``; tests check that the two agree).  ``name`` is cut to its
    first 100 bytes, which may end inside a UTF-8 sequence; prefix, uname, gname, devmajor and devminor are
    NUL; numbers are zero-padded octal ending in NUL; the checksum is six octal digits, NUL, space."""
    h = bytearray(BLOCK)
    name = name[:100]
    h[0 : len(name)] = name
    h[100:108] = b"%07o\0" % mode
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"%011o\0" % mtime
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[157 : 157 + len(linkname)] = linkname
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _canonical_record(key: str, value: bytes) -> bytes:
    """``LEN KEY=VALUE\\n`` with the smallest LEN that counts the whole record, its own digits included."""
    body = b" " + key.encode("ascii") + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode("ascii") + body


class Refused(Exception):
    """A destination's refusal of the current entry (say, the path exists already); the reader reports it
    as a :class:`VerificationError` naming the entry."""


class Destination(Protocol):
    """Where the entries go, called in archive order.  Data of a file comes in ascending, non-overlapping
    pieces between ``open_file`` and ``end_file`` (the rest of the file is a hole)."""

    def open_file(self, entry: Any) -> None: ...

    def write_at(self, offset: int, data: memoryview) -> None: ...

    def end_file(self, entry: Any, mode: int, mtime: int) -> None: ...

    def make_dir(self, path: str, mode: int, mtime: int) -> None: ...

    def make_symlink(self, path: str, target: str, mtime: int) -> None: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...


class InnerReader:
    """Strict, bounded push parser for one inner archive, driving ``dest``."""

    def __init__(self, expected: Sequence[Any], dest: Destination, *, max_entry_header: int = 64 * 1024) -> None:
        seen: set[str] = set()
        for e in expected:
            err = path_problem(e.path)
            if err:
                raise VerificationError(f"inner archive: expected path {e.path!r}: {err}")
            if e.type not in TYPEFLAGS:
                raise VerificationError(f"inner archive: expected entry {e.path!r} has bad type {e.type!r}")
            if e.path in seen:
                raise VerificationError(f"inner archive: expected entry {e.path!r} listed twice")
            if not (0 <= e.data <= e.size) or (e.type != "file" and (e.size or e.data)):
                raise VerificationError(f"inner archive: expected entry {e.path!r} has bad sizes")
            seen.add(e.path)
        self._expected = list(expected)
        self._max_header = max_entry_header
        self._dest = dest
        # path -> is it a directory, for every path this archive has made so far (entries and implicit parents)
        self._made: dict[str, bool] = {}
        self._index = 0
        self._state = "header"
        self._need = BLOCK
        self._buf = bytearray()
        self._pax: dict[str, bytes] | None = None
        self._pax_len = 0
        self._pax_hdr = b""  # the pax header's own ustar block, and its records, for the canonical check
        self._pax_raw = b""
        self._zero_blocks = 0
        self._entry: Any = None
        self._mode = 0
        self._mtime = 0
        self._stored = 0
        # flat arrays of unsigned 64-bit ints, not lists of tuples: a 1,000,000-region map stays ~16 MB
        self._map_nums = array("Q")
        self._map_partial = b""
        self._map_bytes = 0
        self._regions = array("Q")  # offset, length, offset, length, ...
        self._reg_i = 0
        self._reg_done = 0
        self._data_left = 0
        self._pad_left = 0
        self._failed = False
        self.data_done = 0  # entry data bytes written (or validated) so far: what progress counts

    # ---- public

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Consume the next piece of the archive (any size)."""
        if self._failed:
            raise VerificationError("inner archive: extractor already failed")
        mv = memoryview(data).cast("B")
        try:
            while len(mv):
                mv = self._step(mv)
        except Refused as e:
            self._fail()
            raise self._bad(str(e)) from None
        except BaseException:
            self._fail()
            raise

    def finish(self) -> None:
        """Check the archive ended cleanly, let the destination finish (directory modes), release it."""
        if self._failed:
            raise VerificationError("inner archive: extractor already failed")
        try:
            if self._state != "done":
                raise VerificationError(
                    f"inner archive truncated (at entry {self._index + 1} of {len(self._expected)})"
                )
            self._dest.finish()
        except Refused as e:
            self._fail()
            raise self._bad(str(e)) from None
        except BaseException:
            self._fail()
            raise
        self._dest.close()
        self._state = "closed"

    def close(self) -> None:
        """Release the destination after an error or when giving up (idempotent)."""
        self._dest.close()

    # ---- internals

    def _fail(self) -> None:
        self._failed = True
        self.close()

    def _where(self) -> str:
        if self._entry is not None:
            return f"entry {self._entry.path!r}"
        return f"entry {self._index + 1}"

    def _bad(self, msg: str) -> VerificationError:
        return VerificationError(f"inner archive, {self._where()}: {msg}")

    def _collect(self, mv: memoryview) -> tuple[bytes | None, memoryview]:
        """Gather ``self._need`` bytes into the small buffer (headers, pax data, map blocks)."""
        take = min(self._need - len(self._buf), len(mv))
        self._buf += mv[:take]
        mv = mv[take:]
        if len(self._buf) < self._need:
            return None, mv
        out = bytes(self._buf)
        self._buf.clear()
        return out, mv

    def _step(self, mv: memoryview) -> memoryview:
        state = self._state
        if state == "data":
            return self._write_data(mv)
        if state == "pad":
            take = min(self._pad_left, len(mv))
            if any(mv[:take]):
                raise self._bad("non-zero padding")
            self._pad_left -= take
            if not self._pad_left:
                self._end_entry()
            return mv[take:]
        if state in ("done", "closed"):
            raise VerificationError("inner archive: data after the end of the archive")
        chunk, mv = self._collect(mv)
        if chunk is None:
            return mv
        if state == "header":
            self._on_header(chunk)
        elif state == "pax":
            self._on_pax(chunk)
        elif state == "map":
            self._on_map_block(chunk)
        return mv

    def _on_header(self, h: bytes) -> None:
        if h == ZEROS:
            if self._pax is not None:
                raise self._bad("end of archive after a pax header")
            self._zero_blocks += 1
            if self._zero_blocks == 2:
                if self._index != len(self._expected):
                    missing = self._expected[self._index].path
                    raise VerificationError(f"inner archive: entry {missing!r} missing")
                self._state = "done"
            return
        if self._zero_blocks:
            raise VerificationError("inner archive: data after an end-of-archive block")
        stored_sum = _octal(h[148:156], "checksum")
        if stored_sum != sum(h) - sum(h[148:156]) + 8 * 0x20:
            raise self._bad("tar header checksum mismatch")
        if h[257:265] != b"ustar\x0000":
            raise self._bad("not a POSIX ustar header")
        typeflag = h[156:157]
        size = _octal(h[124:136], "size")
        if typeflag == b"x":
            if self._pax is not None:
                raise self._bad("two pax headers in a row")
            if not 0 < size <= self._max_header:
                raise self._bad(f"pax header size {size} out of bounds")
            if self._index >= len(self._expected):
                raise VerificationError("inner archive: unexpected extra entry")
            self._pax_len = size
            self._pax_hdr = h
            self._need = size + pad(size)
            self._state = "pax"
            return
        if self._pax is None:
            raise self._bad("entry without pax header")
        if self._index >= len(self._expected):
            raise VerificationError("inner archive: unexpected extra entry")
        self._begin_entry(h, typeflag, size, self._pax)

    def _on_pax(self, chunk: bytes) -> None:
        if any(chunk[self._pax_len :]):
            raise self._bad("non-zero padding after pax header")
        self._pax_raw = chunk[: self._pax_len]
        self._pax = _parse_pax(self._pax_raw)
        self._need = BLOCK
        self._state = "header"

    def _begin_entry(self, h: bytes, typeflag: bytes, ustar_size: int, pax: dict[str, bytes]) -> None:
        exp = self._expected[self._index]
        self._entry = exp
        self._pax = None
        if typeflag != TYPEFLAGS[exp.type]:
            raise self._bad(f"type {typeflag!r} where {exp.type} was expected")
        if "path" not in pax:
            raise self._bad("pax header without path")
        name = _utf8(pax["path"], "path")
        has_sparse_keys = any(k.startswith("GNU.sparse.") for k in pax)
        if has_sparse_keys:
            if "GNU.sparse.name" not in pax or "GNU.sparse.realsize" not in pax:
                raise self._bad("incomplete GNU sparse header")
            real = _utf8(pax["GNU.sparse.name"], "sparse name")
            if name != sparse_name(real):
                raise self._bad("sparse entry name does not match GNU.sparse.name")
            name = real
        if name != exp.path:
            shown = name[:200]
            raise VerificationError(
                f"inner archive: entry {shown!r} where {exp.path!r} was expected (wrong order or extra entry)"
            )
        sparse = is_sparse(exp)
        if has_sparse_keys != sparse:
            raise self._bad("sparse-ness differs from the manifest")
        realsize = None
        if sparse:
            if pax.get("GNU.sparse.major") != b"1" or pax.get("GNU.sparse.minor") != b"0":
                raise self._bad("unsupported GNU sparse version")
            realsize = _decimal(pax["GNU.sparse.realsize"], "realsize")
        size = ustar_size
        if "size" in pax:
            if ustar_size != 0:
                raise self._bad("size in both pax and ustar header")
            size = _decimal(pax["size"], "size")
        mtime = _octal(h[136:148], "mtime")
        if "mtime" in pax:
            if mtime != 0:
                raise self._bad("mtime in both pax and ustar header")
            mtime = _decimal(pax["mtime"], "mtime", signed=True)
            if not -(2**63) <= mtime < 2**63:  # what utime() accepts; checked here so that both modes agree
                raise self._bad("mtime out of range")
        self._mtime = mtime
        self._mode = _octal(h[100:108], "mode")
        linkname = h[157:257].rstrip(b"\0")
        if exp.type != "symlink" and (linkname or "linkpath" in pax):
            raise self._bad("link target on a non-link entry")
        target = pax.get("linkpath", linkname) if exp.type == "symlink" else b""
        if self._mode > 0o7777:
            raise self._bad("mode with file-type bits")
        if exp.type == "file":
            if sparse:
                if realsize != exp.size:
                    raise self._bad(f"size {realsize} where {exp.size} was expected")
                if size > exp.data + MAX_SPARSE_MAP:
                    raise self._bad("sparse entry too large")
            elif size != exp.size:
                raise self._bad(f"size {size} where {exp.size} was expected")
            self._check_canonical(h, size, mtime, target)
            self._stored = size
            if sparse:
                self._map_nums = array("Q")
                self._map_partial = b""
                self._map_bytes = 0
                self._need = BLOCK
                self._state = "map"
            else:
                self._regions = array("Q", [0, size] if size else [])
                self._open_file()
                self._start_data(size)
            return
        if size != 0:
            raise self._bad("directory or symlink with data")
        if exp.type == "symlink" and (not target or b"\0" in target or len(target) > MAX_LINK):
            raise self._bad("bad symlink target")
        self._check_canonical(h, size, mtime, target)
        if exp.type == "dir":
            self._claim(exp.path, True)
            self._dest.make_dir(exp.path, self._mode, mtime)
        else:
            if "linkpath" in pax and linkname:
                raise self._bad("link target in both pax and ustar header")
            if not target or b"\0" in target or len(target) > MAX_LINK:
                raise self._bad("bad symlink target")
            self._claim(exp.path, False)
            self._dest.make_symlink(exp.path, _utf8(target, "link target"), mtime)
        self._entry = None
        self._index += 1
        self._need = BLOCK
        self._state = "header"

    def _check_canonical(self, h: bytes, stored: int, mtime: int, target: bytes) -> None:
        """The entry's pax records, the pax header's ustar block and the entry's ustar block must be exactly
        what FORMAT.md section 8 prescribes for the expected entry with this stored size, mode, mtime and
        link target: no other record order, optional record, field format, name cut or padding."""
        exp = self._entry
        sparse = is_sparse(exp)
        name = (sparse_name(exp.path) if sparse else exp.path).encode("utf-8")
        records = [_canonical_record("path", name)]
        ustar_size, ustar_mtime = stored, mtime
        if stored >= OCTAL11_LIMIT:
            records.append(_canonical_record("size", b"%d" % stored))
            ustar_size = 0
        if not 0 <= mtime < OCTAL11_LIMIT:
            records.append(_canonical_record("mtime", b"%d" % mtime))
            ustar_mtime = 0
        linkname = target
        if len(target) > 100:
            records.append(_canonical_record("linkpath", target))
            linkname = b""
        if sparse:
            records += [
                _canonical_record("GNU.sparse.major", b"1"),
                _canonical_record("GNU.sparse.minor", b"0"),
                _canonical_record("GNU.sparse.name", exp.path.encode("utf-8")),
                _canonical_record("GNU.sparse.realsize", b"%d" % exp.size),
            ]
        if self._pax_raw != b"".join(records):
            raise self._bad("pax records not in the canonical form (FORMAT.md section 8)")
        d, b = split(exp.path)
        paxname = f"{d}{PAX_DIR}/{b}".encode()
        if self._pax_hdr != _canonical_ustar(paxname, 0o644, len(self._pax_raw), ustar_mtime, b"x", b""):
            raise self._bad("pax header block not in the canonical form (FORMAT.md section 8)")
        typeflag = TYPEFLAGS[exp.type]
        if h != _canonical_ustar(name, self._mode, ustar_size, ustar_mtime, typeflag, linkname):
            raise self._bad("ustar header not in the canonical form (FORMAT.md section 8)")

    def _on_map_block(self, block: bytes) -> None:
        """Parse the sparse map incrementally, one 512-byte block at a time (bounded memory)."""
        self._map_bytes += BLOCK
        if self._map_bytes > MAX_SPARSE_MAP or self._map_bytes > self._stored:
            raise self._bad("sparse map too large")
        buf = self._map_partial + block
        pos = 0
        nums = self._map_nums
        while True:
            if nums and len(nums) == 1 + 2 * nums[0]:
                if any(buf[pos:]):
                    raise self._bad("junk after the sparse map")
                self._map_done()
                return
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            value = _decimal(buf[pos:nl], "sparse map")
            if value >= 2**63:
                raise self._bad("sparse map number out of range")
            nums.append(value)
            pos = nl + 1
            if len(nums) == 1 and not 0 < nums[0] <= MAX_SPARSE_REGIONS:
                raise self._bad(f"sparse map with {nums[0]} regions")
        rest = buf[pos:]
        if len(rest) > 20 or (not rest.isdigit() and rest):
            raise self._bad("malformed sparse map")
        self._map_partial = rest

    def _map_done(self) -> None:
        exp = self._entry
        regions = self._map_nums[1:]
        self._map_nums = array("Q")
        prev_end = 0
        total = 0
        count = len(regions) // 2
        for i in range(count):
            off, length = regions[2 * i], regions[2 * i + 1]
            last = i == count - 1
            if off < prev_end or (i and off == prev_end):
                raise self._bad("sparse map regions overlap, touch or are unsorted")
            if length == 0 and not (last and off == exp.size):
                raise self._bad("empty sparse region")
            if off + length > exp.size:
                raise self._bad("sparse region beyond the end of the file")
            prev_end = off + length
            total += length
        if prev_end != exp.size:
            raise self._bad("sparse map does not end at the file size")
        if total != exp.data:
            raise self._bad(f"{total} data bytes where {exp.data} were expected")
        if self._map_bytes + total != self._stored:
            raise self._bad("sparse entry size does not match its map")
        if regions[-1] == 0:  # the trailing-hole marker: nothing to write, ftruncate extends the file
            del regions[-2:]
        self._regions = regions
        self._open_file()
        self._start_data(total)

    def _start_data(self, total: int) -> None:
        self._reg_i = 0
        self._reg_done = 0
        self._data_left = total
        self._pad_left = pad(self._stored)
        if total:
            self._state = "data"
        elif self._pad_left:
            self._state = "pad"
        else:
            self._end_entry()

    def _write_data(self, mv: memoryview) -> memoryview:
        off, length = self._regions[2 * self._reg_i], self._regions[2 * self._reg_i + 1]
        n = min(length - self._reg_done, len(mv))
        self._dest.write_at(off + self._reg_done, mv[:n])
        self._reg_done += n
        self._data_left -= n
        self.data_done += n
        if self._reg_done == length:
            self._reg_i += 1
            self._reg_done = 0
        if not self._data_left:
            if self._pad_left:
                self._state = "pad"
            else:
                self._end_entry()
        return mv[n:]

    def _end_entry(self) -> None:
        exp = self._entry
        self._dest.end_file(exp, self._mode, self._mtime)
        self._entry = None
        self._index += 1
        self._need = BLOCK
        self._state = "header"

    def _claim(self, path: str, is_dir: bool) -> None:
        """Lexical check, in both modes, before ``path`` is made: no earlier entry of this archive that is a
        file or symlink may be one of its parents, and a file or symlink may not replace a directory made
        earlier.  (In extract mode the filesystem would refuse these too, with the same messages; this way
        validate-only mode refuses them as well.)  Parents are walked only up to the first known one."""
        made = self._made
        d = path.rpartition("/")[0]
        new_dirs = []
        p = d
        while p and p not in made:
            new_dirs.append(p)
            p = p.rpartition("/")[0]
        if p and not made[p]:
            raise self._bad(f"path component of {d!r} is a symlink or not a directory")
        if path in made and not is_dir:
            raise self._bad("already exists in the restore area")
        for p in new_dirs:
            made[p] = True
        made[path] = is_dir

    def _open_file(self) -> None:
        self._claim(self._entry.path, False)
        self._dest.open_file(self._entry)
