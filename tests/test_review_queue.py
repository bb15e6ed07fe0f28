"""Review queues in SQL: every readable image exactly once, seeded order, per-reviewer
counts with undo and skips, model queues on score columns, agreement aggregated in SQL."""
from __future__ import annotations

import json

import pytest
from conftest import write_image
from test_postgres import pg_url  # noqa: F401  (fixture: the CI PostgreSQL, clean schema)

from cxr_core.review import agreement
from cxr_core.review import queues as review
from cxr_core.data.indexing import index_dataset
from cxr_core.storage import open_db
from cxr_core.storage.evals import prediction_columns
from cxr_core.storage.relabels import original_labels
from db.models import EvalPrediction, Evaluation, ImageRow, Run

N_NORMAL, N_PNEU = 12, 18


@pytest.fixture(params=["sqlite", "postgresql"])
def big(request, cxr_home, tmp_path):
    """30 images (12 normal, 18 pneumonia: half bacteria, half virus), one unreadable, one
    gone from disk; returns (db, dataset_id, {relpath: id})."""
    root = tmp_path / "ds" / "train"
    for i in range(N_NORMAL):
        write_image(root / "NORMAL" / f"IM-{i + 1:04d}-0001.png", seed=i)
    for i in range(N_PNEU):
        kind = "bacteria" if i % 2 else "virus"
        write_image(root / "PNEUMONIA" / f"person{i + 1}_{kind}_{i}.png", seed=100 + i)
    (root / "NORMAL" / "IM-0999-0001.png").write_bytes(b"not an image")
    db = open_db() if request.param == "sqlite" else open_db(url=request.getfixturevalue("pg_url"))
    dataset_id = index_dataset(db, root.parent, name="big").dataset_id
    (root / "PNEUMONIA" / "person1_virus_0.png").unlink()
    index_dataset(db, root.parent, name="big")  # flagged missing, kept
    with db.session() as s:
        ids = {r.relpath: r.id for r in s.query(ImageRow).filter_by(dataset_id=dataset_id)}
    return db, dataset_id, ids


def readable(ids):
    return {i for p, i in ids.items() if "0999" not in p and "person1_virus" not in p}


def test_random_queue_pages_cover_every_readable_image_once(big):
    db, dataset_id, ids = big
    state = review.load_state(db, dataset_id)
    pages = [review.build_queue(db, state, "random", seed=7, offset=o, limit=8)
             for o in range(0, 40, 8)]
    order = [e.image_id for page in pages for e in page]
    assert len(order) == len(set(order)) == len(readable(ids)) == 29
    assert set(order) == readable(ids)
    again = [e.image_id for e in review.build_queue(db, state, "random", seed=7, limit=100)]
    other = [e.image_id for e in review.build_queue(db, state, "random", seed=8, limit=100)]
    assert again == order and other != order and sorted(other) == sorted(order)
    assert order != sorted(order)  # shuffled, not id order


def test_counts_next_skips_and_undo_per_reviewer(big):
    db, dataset_id, ids = big
    state = review.load_state(db, dataset_id)
    view = review.next_in_queue(db, state, "class", "alice", class_name="NORMAL")
    assert (view.n_reviewed, view.n_left, view.n_total) == (0, 12, 12)  # the unreadable one is left out
    first = view.current.image_id
    assert first == min(i for p, i in ids.items() if "NORMAL/" in p and "0999" not in p)
    choice = review.LabelChoice("NORMAL", None)
    rid = review.submit_relabel(db, image_id=first, choice=choice, reviewer="alice")
    view = review.next_in_queue(db, state, "class", "alice", class_name="NORMAL")
    assert (view.n_reviewed, view.n_left) == (1, 11) and view.current.image_id != first
    bob = review.next_in_queue(db, state, "class", "bob", class_name="NORMAL")
    assert (bob.n_reviewed, bob.current.image_id) == (0, first)  # counted per reviewer
    skipped = view.current.image_id
    after_skip = review.next_in_queue(db, state, "class", "alice", class_name="NORMAL",
                                      skipped=[skipped])
    assert after_skip.current.image_id not in (first, skipped)
    review.submit_undo(db, relabel_id=rid, reviewer="alice")
    view = review.next_in_queue(db, state, "class", "alice", class_name="NORMAL")
    assert (view.n_reviewed, view.current.image_id) == (0, first)  # undone: back in the queue
    # Everything reviewed but the skipped one: it comes back last.
    for i in readable(ids):
        if i != skipped and ids_label(ids, i) == "NORMAL":
            review.submit_relabel(db, image_id=i, choice=choice, reviewer="alice")
    view = review.next_in_queue(db, state, "class", "alice", class_name="NORMAL",
                                skipped=[skipped])
    assert (view.current.image_id, view.n_left) == (skipped, 1)


def ids_label(ids, image_id):
    return next(p for p, i in ids.items() if i == image_id).split("/")[1]


def add_eval(db, dataset_id, probs_by_id, labels):
    with db.session() as s:
        run = Run(name="r", status="finished", config_json="{}")
        s.add(run)
        s.flush()
        ev = Evaluation(run_id=run.id, model_ref=f"run:{run.id}", dataset_id=dataset_id,
                        split="train", labels_json=json.dumps(labels), images_key="k")
        s.add(ev)
        s.flush()
        s.add_all([EvalPrediction(evaluation_id=ev.id, image_id=i, y_true=0,
                                  probs_json=json.dumps(p), **prediction_columns(p, labels))
                   for i, p in probs_by_id.items()])
        return run.id


def test_three_class_model_queues_use_argmax_and_top2_gap(big):
    db, dataset_id, ids = big
    with db.session() as s:
        orig = original_labels(session=s, dataset_id=dataset_id)
    labels = ["NORMAL", "BACTERIA", "VIRUS"]
    probs = {}
    for n, (i, (label, sub)) in enumerate(sorted(orig.items())):
        truth = 0 if label == "NORMAL" else (1 if sub == "bacteria" else 2)
        wrong = (truth + 1) % 3
        p = [0.1, 0.1, 0.1]
        p[wrong if n % 3 == 0 else truth] = 0.5 + n / 100  # every third one predicted wrong
        probs[i] = p
    add_eval(db, dataset_id, probs, labels)
    state = review.load_state(db, dataset_id)
    dis = review.build_queue(db, state, "disagreement", limit=100)
    expected = [i for n, i in enumerate(sorted(orig)) if n % 3 == 0 and i in readable(ids)]
    assert sorted(e.image_id for e in dis) == sorted(expected)
    margins = [max(probs[e.image_id]) - 0.1 for e in dis]
    assert margins == sorted(margins, reverse=True)  # most confident disagreement first
    assert all(e.predicted in labels and e.run_ref == state.model_ref for e in dis)
    unc = review.build_queue(db, state, "uncertain", limit=100)
    assert len(unc) == 29 and unc[0].image_id == min(
        readable(ids), key=lambda i: (max(probs[i]), i))
    view = review.next_in_queue(db, state, "disagreement", "alice")
    assert (view.n_total, view.current.image_id) == (len(expected), dis[0].image_id)


def test_binary_threshold_moves_the_decision(big):
    db, dataset_id, ids = big
    with db.session() as s:
        orig = original_labels(session=s, dataset_id=dataset_id)
    probs = {i: [0.4, 0.6] for i in orig}  # P(pneumonia) 0.6 everywhere
    run_id = add_eval(db, dataset_id, probs, ["NORMAL", "PNEUMONIA"])
    state = review.load_state(db, dataset_id)
    assert state.threshold is None  # 0.5: every normal is a disagreement
    assert review.next_in_queue(db, state, "disagreement", "a").n_total == 12
    from cxr_core.storage import evals

    db.write(lambda s: evals.add_operating_point(session=s, run_id=run_id, threshold=0.7,
                                                 method="manual", target=None,
                                                 sensitivity=None, specificity=None,
                                                 changed_by="t"))
    state = review.load_state(db, dataset_id)
    assert state.threshold == 0.7  # now every pneumonia is one
    assert review.next_in_queue(db, state, "disagreement", "a").n_total == 17


def test_agreement_and_conflict_pages_in_sql(big):
    db, dataset_id, ids = big
    some = sorted(readable(ids))[:6]
    normal, pneu = review.LabelChoice("NORMAL", None), review.LabelChoice("PNEUMONIA", "virus")
    for n, i in enumerate(some):
        review.submit_relabel(db, image_id=i, choice=normal, reviewer="alice")
        review.submit_relabel(db, image_id=i, choice=pneu if n < 3 else normal, reviewer="bob")
    wrong = review.submit_relabel(db, image_id=some[5], choice=pneu, reviewer="alice")
    review.submit_undo(db, relabel_id=wrong, reviewer="alice")  # undone: alice's NORMAL stands
    agr = agreement.agreement(db, dataset_id, conflicts_limit=2)
    (pair,) = agr.pairs
    assert (pair.reviewer_a, pair.reviewer_b, pair.n_images, pair.agreement) == (
        "alice", "bob", 6, 0.5)
    assert agr.n_conflicts == 3 and [c.image_id for c in agr.conflicts] == some[:2]
    assert agr.conflicts[0].labels == (("alice", "NORMAL"), ("bob", "PNEUMONIA·virus"))
    page2 = agreement.agreement(db, dataset_id, conflicts_limit=2, conflicts_offset=2)
    assert [c.image_id for c in page2.conflicts] == [some[2]]
    assert review.newest_relabel_id(db, dataset_id) == wrong + 1


def test_kappa_from_counts_is_sklearns_kappa():
    import random

    rng = random.Random(0)
    labels = ["NORMAL", "PNEUMONIA·virus", "PNEUMONIA·bacteria"]
    a = [rng.choice(labels) for _ in range(300)]
    b = [x if rng.random() < 0.7 else rng.choice(labels) for x in a]
    cells = {}
    for x, y in zip(a, b):
        cells[(x, y)] = cells.get((x, y), 0) + 1
    counts = [(x, y, n) for (x, y), n in cells.items()]
    assert agreement.kappa_from_counts(counts) == pytest.approx(agreement.cohen_kappa(a, b))
    assert agreement.kappa_from_counts([("N", "N", 5)]) is None  # one label: undefined
