"""fetch-kermany: offline it fails at once with what to do; a local archive (built here, the
release's layout in miniature) is unpacked, checked and indexed; a download resumes."""
from __future__ import annotations

import http.server
import json
import threading
import time
import zipfile
from pathlib import Path

import pytest
from conftest import write_image

from cxr_core.cli import main
from cxr_core.core.errors import DatasetError
from cxr_core.data import fetch

SMALL = ({("train", "NORMAL"): 3, ("train", "PNEUMONIA"): 4, ("test", "NORMAL"): 2,
          ("test", "PNEUMONIA"): 2},)


def _archive(tmp_path: Path, counts=SMALL[0]) -> Path:
    """A zip shaped like ChestXRay2017.zip: chest_xray/{train,test}/{NORMAL,PNEUMONIA}/*.jpeg
    plus the macOS resource forks the real one carries."""
    src = tmp_path / "src"
    for (split, cls), n in counts.items():
        for k in range(n):
            name = f"IM-{k:04d}-0001.jpeg" if cls == "NORMAL" else f"person{k}_bacteria_{k}.jpeg"
            write_image(src / "chest_xray" / split / cls / name, seed=k, fmt="JPEG")
    archive = tmp_path / fetch.ARCHIVE
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(src.rglob("*.jpeg")):
            zf.write(f, f.relative_to(src).as_posix())
        zf.writestr("__MACOSX/chest_xray/._junk", b"junk")
    return archive


def test_offline_it_fails_at_once_naming_the_url_and_what_to_do(cxr_home, tmp_path, capsys):
    started = time.monotonic()
    code = main(["fetch-kermany", "--out", str(tmp_path / "k"), "--url",
                 "http://127.0.0.1:9/ChestXRay2017.zip", "--json"])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - started < 10
    assert "http://127.0.0.1:9/ChestXRay2017.zip" in err and fetch.PAGE in err
    assert "copy it to" in err and "--url" in err
    assert not (tmp_path / "k" / "chest_xray").exists()


def test_a_local_archive_is_unpacked_checked_and_indexed(cxr_home, tmp_path, capsys,
                                                         monkeypatch):
    archive = _archive(tmp_path)
    monkeypatch.setattr(fetch, "EXPECTED", SMALL)
    out = fetch.fetch_kermany(tmp_path / "k", url=archive.as_uri(), expected=SMALL)
    assert out["counts"] == {"test/NORMAL": 2, "test/PNEUMONIA": 2, "train/NORMAL": 3,
                             "train/PNEUMONIA": 4}
    assert not (tmp_path / "k" / "__MACOSX").exists()
    assert main(["fetch-kermany", "--out", str(tmp_path / "k2"), "--url", archive.as_uri(),
                 "--name", "mini", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["index"]["dataset"] == "mini" and printed["index"]["images"] == 11
    assert printed["index"]["by_split"] == {"test": 4, "train": 7}


def test_counts_other_than_the_release_are_refused(tmp_path):
    archive = _archive(tmp_path)
    with pytest.raises(DatasetError, match="does not hold the Kermany release"):
        fetch.fetch_kermany(tmp_path / "k", url=archive.as_uri())  # the real counts expected


def test_a_broken_archive_says_to_fetch_again(tmp_path):
    bad = tmp_path / fetch.ARCHIVE
    bad.write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="not a zip archive"):
        fetch.fetch_kermany(tmp_path / "k", url=bad.as_uri())


class _Ranged(http.server.SimpleHTTPRequestHandler):
    """Serves files with Range support (SimpleHTTPRequestHandler has none)."""

    def do_GET(self):  # noqa: N802 - http.server's name
        path = Path(self.translate_path(self.path))
        data = path.read_bytes()
        start = 0
        if rng := self.headers.get("Range"):
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


def test_an_interrupted_download_resumes_where_it_stopped(tmp_path):
    archive = _archive(tmp_path)
    served = tmp_path / "served"
    served.mkdir()
    (served / fetch.ARCHIVE).write_bytes(archive.read_bytes())
    handler = lambda *a, **k: _Ranged(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dest = tmp_path / "k" / ".download" / fetch.ARCHIVE
        dest.parent.mkdir(parents=True)
        whole = archive.read_bytes()
        (dest.parent / (fetch.ARCHIVE + ".part")).write_bytes(whole[:1000])  # the first try
        seen = []
        url = f"http://127.0.0.1:{server.server_port}/{fetch.ARCHIVE}"
        fetch.download(url, dest, progress=lambda d, t: seen.append((d, t)))
        assert dest.read_bytes() == whole and seen[-1] == (len(whole), len(whole))
        assert seen[0][0] > 1000  # it went on from byte 1000
    finally:
        server.shutdown()
