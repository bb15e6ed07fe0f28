"""Decode untrusted uploads in a child process with a memory limit (issue 26 item 2).

An upload is decoded where a bad file can only end its own process: ``python -m
cxr_core.data.sandbox``, a fresh interpreter (never a fork of the multi-threaded web process)
that limits its own data segment (``RLIMIT_DATA``: every heap and anonymous ``mmap``
allocation counts, shared libraries do not) to the decode budget plus the interpreter's
footprint, then decodes one file per request with :func:`cxr_core.data.images.decode_upload`.
A decode over the limit fails with ``MemoryError`` in the child; a decoder that crashes or is
killed ends only the child; one that hangs is killed after a timeout. Each becomes one
:class:`~cxr_core.core.errors.ImageLoadError` for that file, and the next file gets a new
child. One child serves a whole request (a Predict batch), so the interpreter starts once.

The protocol carries no pickle in either direction (a decoder exploited by a hostile file must
not run code in the web process by what it sends back): a request is a JSON header and the
file's bytes; a reply is a JSON header that lists uint8 arrays by shape, then their bytes,
checked against the header and a size cap before anything is built from them. Each reply also
carries the child's peak resident memory (``ru_maxrss``), which the robustness tests assert.

Imports :mod:`cxr_core.core` and :mod:`cxr_core.data.images` (which never imports it back).
"""
from __future__ import annotations

import json
import os
import resource
import select
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from cxr_core.core.errors import ImageLoadError
from cxr_core.data import images

# What the child holds before it decodes anything (Python, NumPy, Pillow, pydicom: about
# 60 MB of data segment measured, see docs/benchmarks.md): added to the decode budget.
BASE_BYTES = 256 * 2**20
DEFAULT_TIMEOUT_S = 60.0
MAX_REPLY_BYTES = 256 * 2**20  # what one reply may carry (views, display, PNG): checked first
_HEADER_MAX = 1 << 20
_LEN = struct.Struct(">I")
_REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, eq=False)  # eq=False: holds arrays
class Decoded:
    """One upload, decoded in the child (see :class:`cxr_core.data.images.DecodedUpload`),
    and the child's peak resident memory in bytes so far (``ru_maxrss``)."""

    views: tuple[np.ndarray, ...]
    display: np.ndarray | None
    png: bytes | None
    dicom: bool
    max_rss: int


class UploadDecoder:
    """A child process that decodes uploads one at a time under a memory limit.

    Use it as a context manager around one request (the child starts at the first file and
    is ended on exit); a child that died or hung is replaced for the next file::

        with UploadDecoder(memory_bytes=limit) as dec:
            for name, data in files:
                decoded = dec.decode(data, name=name, specs=((224, 1),))

    Args:
        memory_bytes: the child's ``RLIMIT_DATA`` (None: no limit).
        budget: the decode budget passed to :func:`cxr_core.data.images.load_image` in the
            child (None: no estimate check).
        timeout_s: one file's decode is killed after this long.
    """

    def __init__(self, *, memory_bytes: int | None, budget: int | None,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        self.memory_bytes, self.budget, self.timeout_s = memory_bytes, budget, timeout_s
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> UploadDecoder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """End the child (it also ends by itself when its input closes)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        finally:
            proc.stdout.close()

    def _child(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self.close()
            env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join(p for p in (str(_REPO),
                                                             os.environ.get("PYTHONPATH"))
                                                 if p)}
            limit = "none" if self.memory_bytes is None else str(int(self.memory_bytes))
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "cxr_core.data.sandbox", limit],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                env=env, cwd=_REPO)
        return self._proc

    def decode(self, data: bytes, *, name: str, specs: Sequence[tuple[int, int]] = (),
               display_side: int | None = None) -> Decoded:
        """Decode one upload in the child.

        Raises:
            ImageLoadError: the file cannot be decoded, or its process ran out of memory,
                died or timed out (the message names the file).
        """
        proc = self._child()
        header = {"name": name, "specs": [list(s) for s in specs],
                  "display_side": display_side, "budget": self.budget, "size": len(data)}
        deadline = time.monotonic() + self.timeout_s
        try:
            _write_frame(proc.stdin, header, data)
            reply = _read_header(proc.stdout, deadline)
            if not reply.get("ok"):
                raise ImageLoadError(_one_line(reply.get("error"), name))
            return _read_payload(proc.stdout, reply, deadline, name)
        except TimeoutError:
            self._kill()
            raise ImageLoadError(f"{name}: decoding took longer than {self.timeout_s:g} s; "
                                 "refused") from None
        except (EOFError, BrokenPipeError, ConnectionError, OSError) as exc:
            code = self._kill()
            raise ImageLoadError(f"{name}: the decoding process died ({_how(code)}); the file "
                                 "was refused, nothing else was affected") from exc

    def _kill(self) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        code = proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        return code


def load_upload(data: bytes, name: str, specs: Sequence[tuple[int, int]] = (),
                display_side: int | None = None) -> images.DecodedUpload:
    """:func:`cxr_core.data.images.decode_upload` of one file in a child process limited to
    the decode budget plus the interpreter's footprint: a hostile file ends its own process,
    never the caller's. Many files: use one :class:`UploadDecoder`.

    Raises:
        ImageLoadError: the file cannot be decoded, or its process ran out of memory, crashed
            or timed out.
    """
    budget = images.decode_budget()
    with UploadDecoder(memory_bytes=decode_limit(budget), budget=budget) as dec:
        out = dec.decode(data, name=name, specs=specs, display_side=display_side)
    return images.DecodedUpload(out.views, out.display, out.png, out.dicom)


def decode_limit(budget: int | None) -> int | None:
    """The child's memory limit for a decode budget: the budget plus its own footprint."""
    return None if budget is None else budget + BASE_BYTES


# -- The wire: JSON headers and raw bytes, no pickle ------------------------------------------

def _write_frame(out: BinaryIO, header: dict, payload: bytes = b"") -> None:
    raw = json.dumps(header).encode("utf-8")
    out.write(_LEN.pack(len(raw)) + raw)
    out.write(payload)
    out.flush()


def _read_exact(stream: BinaryIO, n: int, deadline: float | None) -> bytes:
    """``n`` bytes from a pipe, or EOFError (closed) / TimeoutError (past ``deadline``)."""
    fd, parts, left = stream.fileno(), [], n
    while left:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _read_header(stream: BinaryIO, deadline: float | None) -> dict:
    (size,) = _LEN.unpack(_read_exact(stream, _LEN.size, deadline))
    if size > _HEADER_MAX:
        raise EOFError(f"reply header of {size} bytes")
    header = json.loads(_read_exact(stream, size, deadline))
    if not isinstance(header, dict):
        raise EOFError("reply header is not an object")
    return header


def _shape(raw: Any) -> tuple[int, ...]:
    if not (isinstance(raw, list) and 1 <= len(raw) <= 3
            and all(isinstance(d, int) and 0 <= d <= 1 << 16 for d in raw)):
        raise EOFError(f"bad array shape {raw!r}")
    return tuple(raw)


def _read_payload(stream: BinaryIO, reply: dict, deadline: float, name: str) -> Decoded:
    """The arrays a reply lists (uint8 only, sizes checked before reading)."""
    shapes = [_shape(s) for s in reply.get("views", [])]
    display = None if reply.get("display") is None else _shape(reply["display"])
    png = reply.get("png")
    if png is not None and not (isinstance(png, int) and png >= 0):
        raise EOFError("bad PNG size")
    sizes = [int(np.prod(s)) for s in shapes] + ([int(np.prod(display))] if display else [])
    if sum(sizes) + (png or 0) > MAX_REPLY_BYTES:
        raise EOFError(f"reply of {sum(sizes) + (png or 0)} bytes")
    views = tuple(np.frombuffer(_read_exact(stream, n, deadline), np.uint8).reshape(s)
                  for n, s in zip(sizes, shapes))
    shown = (np.frombuffer(_read_exact(stream, sizes[-1], deadline), np.uint8).reshape(display)
             if display else None)
    png_bytes = _read_exact(stream, png, deadline) if png is not None else None
    return Decoded(views, shown, png_bytes, bool(reply.get("dicom")),
                   int(reply.get("max_rss") or 0))


def _one_line(message: Any, name: str) -> str:
    text = " ".join(str(message or "cannot decode image").split())[:500]
    return text if text.startswith(f"{name}: ") else f"{name}: {text}"


def _how(exitcode: int | None) -> str:
    if exitcode is None:
        return "it did not answer"
    if exitcode < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


# -- The child --------------------------------------------------------------------------------

def _max_rss() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def _limit_memory(limit: int | None) -> None:
    if limit is None:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))


def _serve_one(request: dict, data: bytes, limit: int | None) -> tuple[dict, list[bytes]]:
    from cxr_core.core.errors import CxrError

    name = str(request.get("name") or "upload")
    try:
        out = images.decode_upload(data, name, [tuple(s) for s in request.get("specs") or ()],
                            request.get("display_side"), request.get("budget"))
    except MemoryError:
        shown = "its limit" if limit is None else f"the {limit / 2**20:,.0f} MB"
        return {"ok": False, "error": f"{name}: decoding needs more memory than {shown} its "
                                      "process may use; refused"}, []
    except CxrError as exc:
        return {"ok": False, "error": str(exc)}, []
    except Exception as exc:  # noqa: BLE001 - a decoder bug on one hostile file
        return {"ok": False, "error": f"{name}: cannot decode image "
                                      f"({type(exc).__name__}: {exc})"}, []
    arrays = [np.ascontiguousarray(v, dtype=np.uint8) for v in out.views]
    shown = None if out.display is None else np.ascontiguousarray(out.display, dtype=np.uint8)
    header = {"ok": True, "views": [list(a.shape) for a in arrays],
              "display": None if shown is None else list(shown.shape),
              "png": None if out.png is None else len(out.png), "dicom": out.dicom}
    payload = [a.tobytes() for a in arrays] + ([shown.tobytes()] if shown is not None else [])
    return header, payload + ([out.png] if out.png is not None else [])


def serve(limit: int | None, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """The child's loop: limit memory, then one reply per request until stdin closes."""
    import pydicom.pixels  # noqa: F401 - imported before the limit applies

    _limit_memory(limit)
    while True:
        try:
            request = _read_header(stdin, None)
            data = _read_exact(stdin, int(request.get("size") or 0), None)
        except EOFError:
            return
        header, payload = _serve_one(request, data, limit)
        del data
        header["max_rss"] = _max_rss()
        _write_frame(stdout, header, b"".join(payload))


def main(argv: Sequence[str]) -> None:
    """``python -m cxr_core.data.sandbox LIMIT|none``: the replies go to the real stdout;
    anything a library prints goes to stderr (fd 1 is pointed there), never into a reply."""
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(None if argv[0] == "none" else int(argv[0]), sys.stdin.buffer, replies)


if __name__ == "__main__":
    main(sys.argv[1:])
