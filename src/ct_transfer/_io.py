"""One place per file format: every read turns any failure into ``CTTransferError("<path>: <why>")``,
every write is atomic (temporary file in the same folder, then ``os.replace``) so a failure leaves
nothing half-written and never modifies an existing file."""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import re
import tempfile
from pathlib import Path

from .errors import CTTransferError, first_line


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return first_line(exc)


def why(exc: BaseException) -> str:
    """The short reason of an OS or library error ("no space left on device")."""
    return _why(exc)


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` can only set it, which would be
    a process-wide side effect racing other threads); Linux reports it in /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", **kwargs):
    """Write ``path`` through a temporary file; on any error the temporary file is removed."""
    path = Path(path)
    if path.is_dir():
        raise CTTransferError(f"{path}: is a folder, not a file")
    if path.exists() and not path.is_file():  # /dev/null, a FIFO: never replaced by a rename
        raise CTTransferError(f"{path}: is not a regular file")
    if not path.parent.is_dir():
        raise CTTransferError(f"{path}: folder {path.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:100]}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise CTTransferError(f"{path.parent}: cannot write here ({_why(exc)})") from None
    try:
        # mkstemp makes 0600 files; a run or report is meant to be read like any other file the
        # user writes (colleagues on a shared server), so give it the mode the umask asks for
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **kwargs) as fh:
            yield fh
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise CTTransferError(f"{path}: cannot write ({_why(exc)})") from None
        raise


def write_bytes(path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_text(path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _finite(obj):
    """JSON has no NaN/inf: write them as null rather than invalid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path, obj) -> None:
    write_text(path, json.dumps(_finite(obj), indent=2, default=float) + "\n")


def read_json(path, *, what: str = "JSON file") -> dict:
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CTTransferError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CTTransferError(f"{path}: not a readable {what} ({_why(exc)})") from None
    if not isinstance(obj, dict):
        raise CTTransferError(f"{path}: not a valid {what} (expected an object)")
    return obj


# A cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets (OWASP's
# list; the full-width forms too, which some spreadsheet locales accept as formula signs).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _formula_like(text: str) -> bool:
    """Starts like a formula, after any quotes we added (so that quoting is reversible)."""
    return text.lstrip("'").startswith(FORMULA_STARTS)


def csv_safe(value):
    """A cell a spreadsheet shows as text: a non-numeric string that could be read as a formula
    (``=HYPERLINK(...)``, ``-2+3``, ``@SUM``) gets a leading ``'``; numbers, numeric strings like
    ``-600`` and other values are unchanged. ``csv_unsafe`` undoes it exactly."""
    if isinstance(value, str) and _formula_like(value) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_unsafe(text: str) -> str:
    return text[1:] if text.startswith("'") and _formula_like(text[1:]) else text


def write_csv(path, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    """Rows as CSV, every text cell (header included) made safe for spreadsheets (``csv_safe``);
    ``read_csv`` gives the original text back."""
    fieldnames = fieldnames or (list(rows[0]) if rows else [])
    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        plain = csv.writer(fh, lineterminator="\n")
        # the minimal quoting does not quote a lone CR when the line ends in LF: such rows are quoted whole
        quoted = csv.writer(fh, lineterminator="\n", quoting=csv.QUOTE_ALL)
        for cells in ([csv_safe(f) for f in fieldnames],
                      *([csv_safe(row.get(f, "")) for f in fieldnames] for row in _checked(rows, fieldnames))):
            (quoted if any(isinstance(c, str) and "\r" in c for c in cells) else plain).writerow(cells)


def _checked(rows, fieldnames):
    for row in rows:
        extra = set(row) - set(fieldnames)
        if extra:  # as csv.DictWriter does
            raise ValueError(f"dict contains fields not in fieldnames: {', '.join(map(repr, extra))}")
        yield row


def _row(header: list[str], cells: list[str]) -> dict:
    """One row as ``csv.DictReader`` makes it: extra cells under ``None``, missing ones ``None``."""
    row = dict(zip(header, cells))
    if len(cells) > len(header):
        row[None] = cells[len(header):]
    for key in header[len(cells):]:
        row[key] = None
    return row


def read_csv(path, *, required: tuple[str, ...] = (), what: str = "CSV file") -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise CTTransferError(f"{path}: {what} not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
        if "\x00" in text:
            raise ValueError("binary content")
        reader = csv.reader(io.StringIO(text, newline=""))
        header = [csv_unsafe(f) for f in next(reader, [])]
        rows = [_row(header, [csv_unsafe(c) for c in cells]) for cells in reader if cells]
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:
        raise CTTransferError(f"{path}: not a readable {what} ({_why(exc)})") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise CTTransferError(f"{path}: {what} needs the columns {', '.join(required)}")
    for i, r in enumerate(rows, 2):
        if None in r or any(r.get(c) in (None, "") for c in required):
            raise CTTransferError(f"{path}: line {i} is malformed (every row needs {', '.join(required)})")
    return rows


def save_checkpoint(obj, path) -> None:
    import torch

    try:
        with atomic_open(path, "wb") as fh:
            torch.save(obj, fh)
    except CTTransferError:
        raise
    except RuntimeError as exc:  # torch's zip writer reports a full disk as an internal RuntimeError
        raise CTTransferError(f"{path}: cannot write checkpoint ({_disk_why(Path(path).parent, exc)})") from None


def _disk_why(folder: Path, exc: BaseException) -> str:
    """Name the likely cause of a failed write that the library did not report as an OSError."""
    try:
        st = os.statvfs(folder)
        if st.f_bavail * st.f_frsize < 64 * 2**20:
            return "no space left on device"
    except OSError:
        pass
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        return f"file too large for this process's file size limit ({soft} bytes)"
    return f"file write failed: {first_line(exc, 80)}"


def read_text(path, *, what: str = "text file", max_bytes: int = 1 << 20) -> str:
    """A small text file (undecodable bytes replaced); a missing or unreadable one is a one-line error."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(max_bytes)
    except FileNotFoundError:
        raise CTTransferError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise CTTransferError(f"{path}: cannot read {what} ({_why(exc)})") from None
    return data.decode("utf-8", errors="replace")


CHECKPOINT_FORMAT = "ct-transfer"  # safetensors metadata "format" of a run's own checkpoint


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """Tensors to a safetensors file (no pickle: nothing in it can run code), atomically. ``metadata``
    values are stored as JSON text (safetensors metadata is text only)."""
    from safetensors.torch import save

    # copies on the CPU: safetensors refuses tensors that share storage, and the caller keeps its own
    data = save({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()},
                metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})
    write_bytes(path, data)


def _is_safetensors(head: bytes) -> bool:
    """8-byte little-endian header length, then the JSON header."""
    return len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100 * 2**20


def _load_safetensors(path: Path, map_location, keys: tuple[str, ...]) -> dict:
    """A run's own checkpoint (metadata ``format: ct-transfer``) -> ``{"model": tensors, "classes",
    "epoch", ...}`` like a ``.pt`` one; any other safetensors file -> its tensors (a state dict)."""
    from safetensors import SafetensorError, safe_open

    device = "cpu" if map_location is None or isinstance(map_location, dict) or callable(map_location) \
        else str(map_location)
    try:
        with safe_open(str(path), framework="pt", device=device) as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            meta = fh.metadata() or {}
        extra = {k: json.loads(v) for k, v in meta.items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CTTransferError(f"{path}: cannot load checkpoint (the file is damaged or truncated: "
                              f"{first_line(exc, 80)})") from None
    obj = {**extra, "model": tensors} if extra.get("format") == CHECKPOINT_FORMAT else tensors
    if any(k not in obj for k in keys):
        raise CTTransferError(f"{path}: not a ct-transfer checkpoint (missing {', '.join(keys)})")
    return obj


def load_checkpoint(path, *, map_location="cpu", keys: tuple[str, ...] = ("model",)) -> dict:
    """A safetensors file, or ``torch.load(weights_only=True)`` (``.pt``); a truncated or foreign
    file is a one-line error."""
    import torch

    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        head = b""
    if _is_safetensors(head) or path.suffix.lower() == ".safetensors" and path.is_file():
        return _load_safetensors(path, map_location, keys)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        magic = b"PK\x03\x04"  # torch.load below says which
    except OSError:
        magic = b""
    if magic[:4] != b"PK\x03\x04" and magic[:1] != b"\x80":  # zip (torch >= 1.6) or a legacy pickle
        raise CTTransferError(f"{path}: cannot load checkpoint (not a PyTorch checkpoint file"
                              + (", empty)" if not magic else ")"))
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CTTransferError(f"{path}: checkpoint not found") from None
    except IsADirectoryError:
        raise CTTransferError(f"{path}: is a folder, not a checkpoint") from None
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # torch's zip reader on a truncated file
            raise CTTransferError(f"{path}: cannot load checkpoint (the file is damaged or truncated)") from None
        raise CTTransferError(f"{path}: cannot read checkpoint ({_why(exc)})") from None
    except Exception as exc:  # torch raises many types for damaged files
        text = first_line(exc, 100)
        if any(k in text for k in ("zip archive", "central directory", "pickle data was truncated", "Ran out of input")):
            text = "the file is damaged or truncated"
        elif "weights_only" in text or "Unsupported global" in text:
            text = "holds objects other than tensors (not a ct-transfer checkpoint)"
        raise CTTransferError(f"{path}: cannot load checkpoint ({text})") from None
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        raise CTTransferError(f"{path}: not a ct-transfer checkpoint (missing {', '.join(keys)})")
    return obj


def check_writable(path, *, folder: bool = True) -> Path:
    """Prove, before any work and without creating anything, that ``path`` can be written:
    a folder (made later, parents included) or a file whose folder must exist."""
    path = Path(path)
    if folder:
        if path.exists() and not path.is_dir():
            raise CTTransferError(f"{path}: exists and is not a folder")
        probe = path
        while not probe.exists():
            if probe.parent == probe:
                break
            probe = probe.parent
        if not probe.is_dir():
            raise CTTransferError(f"{path}: {probe} is a file, not a folder")
    else:
        if path.is_dir():
            raise CTTransferError(f"{path}: is a folder; give a file name")
        if path.exists() and not path.is_file():
            raise CTTransferError(f"{path}: is not a regular file (a device or pipe); give a file name")
        probe = path.parent
        if not probe.is_dir():
            raise CTTransferError(f"{path}: folder {probe} does not exist")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise CTTransferError(f"{path}: cannot write here ({_why(exc)} at {probe})") from None
    return path


def ensure_writable_dir(path) -> Path:
    """Create ``path`` if needed and prove a file can be written there, before any work starts."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CTTransferError(f"{path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise CTTransferError(f"{path}: cannot write here ({_why(exc)})") from None
    return path
