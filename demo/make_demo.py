"""Rebuild demo/chest_xray_mini from the official train split (224 px copy): how it was made.

    python demo/make_demo.py ../shared/data/chest_xray_224/train

Deterministic: 100 NORMAL, 100 bacterial and 100 viral pneumonia films of the official
**train** split (never test), drawn with a fixed seed, with every film of some patients (so a
patient-grouped split has something to group) and two of the train split's byte-identical
duplicate pairs (so the duplicate check has something to find). Writes the films under
``chest_xray_mini/train/<CLASS>/`` with their original names, and ``manifest.csv``.
"""
from __future__ import annotations

import csv
import hashlib
import random
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "chest_xray_mini"
PER_GROUP = 100  # NORMAL, bacteria, virus
SEED = 2018
DUPLICATES = [("NORMAL", "NORMAL2-IM-0587-0001-0001.jpeg", "NORMAL2-IM-0587-0001-0002.jpeg"),
              ("PNEUMONIA", "person1159_virus_1944.jpeg", "person1159_virus_1945.jpeg")]


def patient(name: str) -> str:
    if m := re.match(r"(person\d+)_", name):
        return m.group(1)
    if m := re.match(r"NORMAL2-IM-(\d+)-", name):
        return f"NORMAL2-{m.group(1)}"
    if m := re.match(r"IM-(\d+)-", name):
        return m.group(1)
    return name


def group(cls: str, name: str) -> str:
    if cls == "NORMAL":
        return "normal"
    return "virus" if "_virus_" in name else "bacteria"


def main(train: Path) -> None:
    by_group: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for cls in ("NORMAL", "PNEUMONIA"):
        for f in sorted((train / cls).glob("*.jpeg")):
            by_group[group(cls, f.name)][patient(f.name)].append(f"{cls}/{f.name}")
    rng = random.Random(SEED)
    chosen: list[str] = [f"{c}/{n}" for c, a, b in DUPLICATES for n in (a, b)]
    for name in ("normal", "bacteria", "virus"):
        patients = by_group[name]
        multi = sorted(p for p, files in patients.items() if len(files) > 1)
        picked = [f for f in chosen if group(f.split("/")[0], f.split("/")[1]) == name]
        for p in rng.sample(multi, 12):  # every film of a dozen patients with several
            picked += [f for f in patients[p] if f not in picked]
        rest = sorted(f for p, files in patients.items() for f in files if f not in picked)
        picked += rng.sample(rest, PER_GROUP - len(picked))
        chosen += [f for f in picked if f not in chosen]
    if OUT.exists():
        shutil.rmtree(OUT)
    rows = []
    for rel in sorted(chosen):
        src = train / rel
        dst = OUT / "train" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        cls, name = rel.split("/")
        rows.append({"file": f"train/{rel}", "class": cls,
                     "subtype": "" if cls == "NORMAL" else group(cls, name),
                     "patient": patient(name),
                     "sha256": hashlib.sha256(dst.read_bytes()).hexdigest(),
                     "source": f"chest_xray/train/{rel} (official train split)"})
    with open(OUT / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} films, {sum(r['class'] == 'NORMAL' for r in rows)} normal")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
