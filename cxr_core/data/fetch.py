"""Fetch the full public Kermany chest X-ray release (Mendeley Data, CC BY 4.0) into the layout
the app reads: ``python -m cxr_core fetch-kermany --out PATH [--url URL]``.

The archive (about 1.2 GB) is downloaded to ``PATH/.download/`` with HTTP range requests, so an
interrupted download resumes where it stopped; an archive already there (or a ``file://`` URL)
is used as is. It is then unpacked into ``PATH/chest_xray/{train,test}/{NORMAL,PNEUMONIA}`` and
checked: the layout must be found and the per-class counts must be those of the release
(Mendeley's own split, or Kaggle's copy with its 16-film ``val`` folder). Offline the command
fails at once, naming the URL and what to do instead; nothing is downloaded at run time by any
other part of the app.
"""
from __future__ import annotations

import shutil
import socket
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

from cxr_core.core.errors import DatasetError
from cxr_core.data import datasets as ds

PAGE = "https://data.mendeley.com/datasets/rscbjbr9sj/2"  # Kermany et al., Mendeley Data v2
URL = ("https://data.mendeley.com/public-files/datasets/rscbjbr9sj/files/"
       "f12eaf6d-6023-432f-acc9-80c9d7393433/file_downloaded")
ARCHIVE = "ChestXRay2017.zip"
# (split, class) -> films: Mendeley's release, and Kaggle's copy (16 train films moved to val).
EXPECTED: tuple[Mapping[tuple[str, str], int], ...] = (
    {("train", "NORMAL"): 1349, ("train", "PNEUMONIA"): 3883,
     ("test", "NORMAL"): 234, ("test", "PNEUMONIA"): 390},
    {("train", "NORMAL"): 1341, ("train", "PNEUMONIA"): 3875, ("val", "NORMAL"): 8,
     ("val", "PNEUMONIA"): 8, ("test", "NORMAL"): 234, ("test", "PNEUMONIA"): 390},
)
CHUNK = 1 << 20
TIMEOUT_S = 15.0  # connecting (and each read): offline fails at once, not after minutes

Progress = Callable[[int, int], None]


def _offline_message(url: str, exc: Exception, out: Path) -> str:
    return (f"cannot download the Kermany release from {url} ({exc}). Without internet: "
            f"download {ARCHIVE} from {PAGE} on a machine that has it, copy it to "
            f"{out / '.download' / ARCHIVE} and run this command again (it unpacks a local "
            "archive), or pass --url to a mirror (file:// works)")


def download(url: str, dest: Path, *, progress: Progress | None = None) -> Path:
    """Download ``url`` to ``dest``, resuming a partial ``dest.part``; returns ``dest``.

    Raises:
        DatasetError: the URL cannot be reached (offline) or the server refuses.
    """
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)  # noqa: S310 - user URL
    except (urllib.error.URLError, socket.timeout, OSError) as exc:
        raise DatasetError(_offline_message(url, exc, dest.parent.parent)) from exc
    with response:
        resumed = getattr(response, "status", 200) == 206
        total = int(response.headers.get("Content-Length") or 0) + (have if resumed else 0)
        done = have if resumed else 0
        with open(part, "ab" if resumed else "wb") as fh:
            while chunk := response.read(CHUNK):
                fh.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total or done)
    part.replace(dest)
    return dest


def unpack(archive: Path, out: Path, *, progress: Progress | None = None) -> Path:
    """Unpack the archive's images into ``out`` (macOS resource forks skipped, member paths
    kept inside ``out``); returns the dataset root the app indexes."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise DatasetError(f"{archive} is not a zip archive ({exc}); delete it and fetch "
                           "again") from exc
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir() and "__MACOSX" not in m.filename
                   and not Path(m.filename).name.startswith(".")]
        root = out.resolve()
        for k, member in enumerate(members, 1):
            target = (out / member.filename).resolve()
            if root not in target.parents:
                raise DatasetError(f"{archive}: member {member.filename!r} would land outside "
                                   f"{out}")
            if not target.exists() or target.stat().st_size != member.file_size:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            if progress is not None:
                progress(k, len(members))
    return ds.discover(out).root


def check_counts(root: Path, expected: tuple[Mapping[tuple[str, str], int], ...] | None = None
                 ) -> dict[str, int]:
    """The (split/class -> films) counts of the unpacked release, if they are one of
    ``expected``.

    Raises:
        DatasetError: another layout or other counts (a truncated or foreign archive).
    """
    expected = EXPECTED if expected is None else expected
    layout = ds.discover(root)
    counts = Counter((e.split, e.label) for e in layout.entries)
    if not any(dict(counts) == dict(want) for want in expected):
        got = {f"{s}/{c}": n for (s, c), n in sorted(counts.items())}
        want = {f"{s}/{c}": n for (s, c), n in sorted(expected[0].items())}
        raise DatasetError(f"the unpacked archive under {root} does not hold the Kermany release: "
                           f"expected {want} (or Kaggle's copy with a val folder). Received: {got}")
    return {f"{s}/{c}": n for (s, c), n in sorted(counts.items())}


def fetch_kermany(out: str | Path, *, url: str = URL, progress: Progress | None = None,
                  expected: tuple[Mapping[tuple[str, str], int], ...] | None = None) -> dict:
    """Download (resumably), unpack and check the release under ``out``.

    Returns:
        ``{"root", "archive", "counts"}``: the dataset root to index and what it holds.

    Raises:
        DatasetError: offline, a bad archive, or counts that are not the release's.
    """
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if url.startswith("file://"):
        archive = Path(urllib.request.url2pathname(url[len("file://"):]))
        if not archive.is_file():
            raise DatasetError(f"no archive at {archive}. Received: --url {url}")
    else:
        archive = download(url, out / ".download" / ARCHIVE, progress=progress)
    root = unpack(archive, out, progress=progress)
    return {"root": str(root), "archive": str(archive), "counts": check_counts(root, expected)}
