"""Blind and double reading with adjudication (issue 27 item 5): the dataset's reading mode,
reads that count only when readers agree, conflicts that keep the prior label until an
adjudicator decides, undo, "confirmed" = a label that counts everywhere, Cohen's and Fleiss'
kappa."""
from __future__ import annotations

import pytest

from cxr_core.auth import policy
from cxr_core.core.errors import ConfigError, PermissionDenied
from cxr_core.data import balance_report
from cxr_core.review import actions
from cxr_core.review import queues as review
from cxr_core.review import reading
from cxr_core.review.agreement import agreement, group_agreement
from cxr_core.review.view import describe_entry
from cxr_core.stats.agreement import fleiss_kappa, rating_table
from cxr_core.storage import audit as audit_store
from cxr_core.storage import relabels as rel_store
from cxr_core.storage import review_queue
from tests.test_postgres import pg_url  # noqa: F401 - fixture
from tests.test_review import add_predictions, db, ds, relabel  # noqa: F401 - fixtures

ADMIN = policy.Principal(identity="lead@h.org", roles=frozenset(policy.ROLES))
ADJ = policy.Principal(identity="senior@h.org", roles=frozenset({"viewer", "reviewer",
                                                                  "adjudicator"}))
SCI = policy.Principal(identity="ds@h.org", roles=frozenset({"viewer", "reviewer",
                                                              "scientist"}))
A = policy.Principal(identity="a@h.org", roles=frozenset({"viewer", "reviewer"}))
B = policy.Principal(identity="b@h.org", roles=frozenset({"viewer", "reviewer"}))
C = policy.Principal(identity="c@h.org", roles=frozenset({"viewer", "reviewer"}))
PNEU_V = review.LabelChoice("PNEUMONIA", "virus")
PNEU_B = review.LabelChoice("PNEUMONIA", "bacteria")
NORMAL = review.LabelChoice("NORMAL", None)


def double(db, dataset_id, blind=False, reads=2):
    return actions.set_reading(db, ADMIN, dataset_id=dataset_id, blind=blind,
                               reads_per_image=reads, note="study protocol")


def read(db, p, image_id, choice, **kw):
    return actions.relabel(db, p, image_id=image_id, choice=choice, **kw)


def current(db, dataset_id):
    with db.session() as s:
        return rel_store.current_labels(session=s, dataset_id=dataset_id)


def confirmed(db, ids):
    with db.session() as s:
        return review_queue.reviewed_among(session=s, reviewer=None, image_ids=ids)


def test_the_reading_mode_is_an_audited_append_only_setting(db, ds):
    dataset_id, _ = ds
    assert reading.reading_setting(db, dataset_id).reads_per_image == 1  # the default
    assert not reading.reading_setting(db, dataset_id).blind
    double(db, dataset_id, blind=True)
    actions.set_reading(db, ADMIN, dataset_id=dataset_id, blind=False, reads_per_image=1)
    history = reading.setting_history(db, dataset_id)
    assert [(h.blind, h.reads_per_image) for h in history] == [(False, 1), (True, 2)]
    assert history[1].changed_by == "lead@h.org"
    with pytest.raises(ConfigError, match="reads_per_image must be an integer from 1 to 5"):
        actions.set_reading(db, ADMIN, dataset_id=dataset_id, blind=True, reads_per_image=0)
    with pytest.raises(PermissionDenied, match="scientist or admin"):
        actions.set_reading(db, A, dataset_id=dataset_id, blind=True, reads_per_image=2)
    with db.session() as s:
        events = audit_store.list_events(session=s, limit=10, action="review_settings")
    assert [(e.outcome, e.actor) for e in events][:1] == [("denied", "a@h.org")]
    assert sum(e.outcome == "ok" for e in events) == 2


def test_agreeing_reads_make_the_label_that_counts(db, ds):
    dataset_id, ids = ds
    image = ids["IM-0001-0001.png"]
    double(db, dataset_id)
    read(db, A, image, PNEU_V)
    assert current(db, dataset_id)[image] == ("NORMAL", None)  # one read counts for nothing
    assert confirmed(db, [image]) == set()
    facts = dict(describe_entry(db, review.load_state(db, dataset_id),
                                review.QueueEntry(image)).facts)
    assert facts["Current"] == "NORMAL"  # what Review says counts
    read(db, B, image, PNEU_V)
    assert current(db, dataset_id)[image] == ("PNEUMONIA", "virus")
    assert confirmed(db, [image]) == {image}
    with db.session() as s:
        rows = rel_store.list_relabels(session=s, image_ids=[image])
    assert [r.kind for r in rows] == ["read", "read", "consensus"]
    assert rows[2].reviewer == "consensus:a@h.org+b@h.org"
    assert rows[2].basis == (rows[0].id, rows[1].id) and rows[0].reads_required == 2
    # A third reader who agrees adds a read, no second consensus.
    read(db, C, image, PNEU_V)
    with db.session() as s:
        assert [r.kind for r in rel_store.list_relabels(session=s, image_ids=[image])] == \
            ["read", "read", "consensus", "read"]


def test_a_conflict_keeps_the_prior_label_until_an_adjudication_overrides_both_reads(db, ds):
    dataset_id, ids = ds
    image = ids["IM-0002-0001.png"]
    double(db, dataset_id)
    read(db, A, image, PNEU_V)
    read(db, B, image, NORMAL)
    assert current(db, dataset_id)[image] == ("NORMAL", None)  # the prior (original) label
    assert confirmed(db, [image]) == set()  # "confirmed" means a label that counts
    with db.session() as s:
        assert review_queue.count_conflicts(session=s, dataset_id=dataset_id) == 1
    state = review.load_state(db, dataset_id)
    assert state.n_conflicts == 1
    view = review.next_in_queue(db, state, "conflicts", "senior@h.org")
    assert view.current.image_id == image and view.n_total == 1
    with pytest.raises(PermissionDenied, match="admin or adjudicator role"):
        actions.adjudicate(db, SCI, image_id=image, choice=PNEU_B)  # scientist: no
    adj = actions.adjudicate(db, ADJ, image_id=image, choice=PNEU_B, note="RLL consolidation")
    assert current(db, dataset_id)[image] == ("PNEUMONIA", "bacteria")  # overrides both reads
    assert confirmed(db, [image]) == {image}
    with db.session() as s:
        row = rel_store.list_relabels(session=s, image_ids=[image])[-1]
        events = audit_store.list_events(session=s, limit=5, action="adjudicate")
    assert (row.id, row.kind, row.reviewer, row.old_label) == (adj, "adjudication",
                                                               "senior@h.org", "NORMAL")
    assert len(row.basis) == 2
    assert [(e.outcome, e.actor, e.target) for e in events] == [
        ("ok", "senior@h.org", f"relabel:{adj}"), ("denied", "ds@h.org", f"image:{image}")]
    assert review.next_in_queue(db, review.load_state(db, dataset_id), "conflicts",
                                "senior@h.org").current is None
    # Undo works as for relabels: the conflict and the prior label come back.
    actions.undo_relabel(db, ADJ, relabel_id=adj)
    assert current(db, dataset_id)[image] == ("NORMAL", None)
    assert review.load_state(db, dataset_id).n_conflicts == 1
    # An admin adjudicates too (admin implies the role); no conflict, no adjudication.
    actions.adjudicate(db, ADMIN, image_id=image, choice=PNEU_V)
    with pytest.raises(ConfigError, match="no conflicting reads to adjudicate"):
        actions.adjudicate(db, ADMIN, image_id=image, choice=NORMAL)


def test_undoing_a_read_undoes_the_consensus_built_on_it(db, ds):
    dataset_id, ids = ds
    image = ids["IM-0003-0001.png"]
    double(db, dataset_id)
    first = read(db, A, image, PNEU_V)
    read(db, B, image, PNEU_V)
    assert current(db, dataset_id)[image] == ("PNEUMONIA", "virus")
    actions.undo_relabel(db, A, relabel_id=first)
    assert current(db, dataset_id)[image] == ("NORMAL", None)
    with db.session() as s:
        rows = rel_store.list_relabels(session=s, image_ids=[image])
    assert [r.kind for r in rows] == ["read", "read", "consensus", "read", "consensus"]
    assert rows[3].undo_of == first and rows[4].undo_of == rows[2].id  # nothing deleted
    read(db, C, image, PNEU_V)  # another reader agrees: a new consensus of B and C
    assert current(db, dataset_id)[image] == ("PNEUMONIA", "virus")


def test_snapshots_and_sql_counts_use_the_labels_that_count(db, ds):
    """Every derivation (Python, the per-image SQL window, Class balance's SQL) agrees."""
    dataset_id, ids = ds
    image = ids["IM-0001-0001.png"]
    with db.session() as s:
        before = rel_store.label_snapshot(session=s, dataset_id=dataset_id)
    double(db, dataset_id)
    read(db, A, image, PNEU_V)
    with db.session() as s:
        one_read = rel_store.label_snapshot(session=s, dataset_id=dataset_id)
        assert rel_store.image_label_version(session=s, image_ids=[image]).labels[image] == \
            ("NORMAL", None)
    assert one_read.hash == before.hash  # a read alone changes no label
    read(db, B, image, PNEU_V)
    with db.session() as s:
        assert rel_store.image_label_version(session=s, image_ids=[image]).labels[image] == \
            ("PNEUMONIA", "virus")
        # labels as of the first read stay those of then
        assert rel_store.label_snapshot(session=s, dataset_id=dataset_id,
                                        as_of_relabel_id=one_read.newest_relabel_id).hash == \
            before.hash
    counts = balance_report.balance_tables(db, dataset_id, "binary", current=True)
    by_class = {}
    for row in counts.counts:
        by_class[row["class"]] = by_class.get(row["class"], 0) + row["images"]
    assert by_class == {"NORMAL": 2, "PNEUMONIA": 4}


def test_double_reading_takes_an_image_out_of_the_queue_once_enough_readers_read_it(db, ds):
    dataset_id, ids = ds
    double(db, dataset_id)
    state = review.load_state(db, dataset_id)
    first = review.next_in_queue(db, state, "class", "a@h.org", class_name="NORMAL").current
    read(db, A, first.image_id, NORMAL)
    read(db, B, first.image_id, PNEU_V)
    # C has not read it, but two readers have: C gets the next film.
    view = review.next_in_queue(db, state, "class", "c@h.org", class_name="NORMAL")
    assert view.current.image_id != first.image_id and view.n_reviewed == 1


def test_blind_reading_records_no_model_output_shown(db, ds):
    dataset_id, ids = ds
    image = ids["person1_bacteria_1.png"]
    add_predictions(db, dataset_id, {image: [0.2, 0.8]})
    actions.set_reading(db, ADMIN, dataset_id=dataset_id, blind=True, reads_per_image=1)
    rid = read(db, A, image, PNEU_B, run_ref="run:1", score=0.8)
    with db.session() as s:
        row = rel_store.list_relabels(session=s, image_ids=[image])[-1]
    assert (row.id, row.kind, row.run_ref, row.score) == (rid, "label", None, None)


def test_reveal_after_answering_says_what_was_hidden(db, ds):
    dataset_id, ids = ds
    image = ids["person2_virus_2.png"]
    add_predictions(db, dataset_id, {image: [0.3, 0.7]})
    double(db, dataset_id, blind=True)
    read(db, B, image, NORMAL)
    state = review.load_state(db, dataset_id)
    entry = review.QueueEntry(image, state.model_ref, 0.7, "PNEUMONIA")
    rid = read(db, A, image, PNEU_V)
    shown = reading.reveal(db, state, entry, rid)
    assert shown.answer == "PNEUMONIA·virus" and shown.folder_label == "PNEUMONIA·virus"
    assert shown.counts_now == "PNEUMONIA·virus"  # a conflict keeps the original here
    assert "adjudicator" in shown.pending and "P(pneumonia) 0.700" in shown.model
    assert dict(shown.readers) == {"a@h.org": "PNEUMONIA·virus", "b@h.org": "NORMAL"}


def test_agreement_compares_reads_and_gives_fleiss_kappa_for_three_readers(db, ds):
    dataset_id, ids = ds
    double(db, dataset_id, reads=3)
    answers = {"IM-0001-0001.png": (NORMAL, NORMAL, NORMAL),
               "IM-0002-0001.png": (NORMAL, PNEU_V, NORMAL),
               "person1_bacteria_1.png": (PNEU_B, PNEU_B, PNEU_B),
               "person2_virus_2.png": (PNEU_V, PNEU_V, PNEU_B)}
    for name, labels in answers.items():
        for who, choice in zip((A, B, C), labels):
            read(db, who, ids[name], choice)
    agr = agreement(db, dataset_id)
    assert {(p.reviewer_a, p.reviewer_b) for p in agr.pairs} == {
        ("a@h.org", "b@h.org"), ("a@h.org", "c@h.org"), ("b@h.org", "c@h.org")}
    # Consensus rows are no reader's answer: only the three readers are compared.
    table, _ = rating_table([[c.text for c in labels] for labels in answers.values()])
    assert agr.fleiss.n_images == 4 and agr.fleiss.ratings_per_image == 3.0
    assert agr.fleiss.kappa == pytest.approx(fleiss_kappa(table))
    assert agr.n_conflicts == 2


def test_fleiss_kappa_of_the_textbook_example():
    """Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories: 0.210."""
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0],
             [2, 2, 8, 1, 1], [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2],
             [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-4)
    assert fleiss_kappa([[3, 0], [3, 0]]) is None  # one category: undefined
    with pytest.raises(ConfigError, match="at least 2 ratings"):
        fleiss_kappa([[1, 0], [2, 1]])
    assert group_agreement([], 0) is None


def test_double_reading_and_adjudication_on_postgres(pg_url, cxr_home, tmp_path):
    """The SQL of conflicts, queues and current counts on PostgreSQL too."""
    from cxr_core.data.indexing import index_dataset
    from cxr_core.storage import open_db
    from tests.test_review import make_dataset

    pg = open_db(url=pg_url)
    dataset_id = index_dataset(pg, make_dataset(tmp_path / "pg"), name="tiny").dataset_id
    with pg.session() as s:
        ids = sorted(rel_store.original_labels(session=s, dataset_id=dataset_id))
    double(pg, dataset_id)
    read(pg, A, ids[0], PNEU_V)
    read(pg, B, ids[0], PNEU_V)  # agree
    read(pg, A, ids[1], PNEU_V)
    read(pg, B, ids[1], NORMAL)  # conflict
    with pg.session() as s:
        assert review_queue.count_conflicts(session=s, dataset_id=dataset_id) == 1
    actions.adjudicate(pg, ADJ, image_id=ids[1], choice=PNEU_B)
    labels = current(pg, dataset_id)
    assert (labels[ids[0]], labels[ids[1]]) == (("PNEUMONIA", "virus"), ("PNEUMONIA", "bacteria"))
    counts = balance_report.balance_tables(pg, dataset_id, "binary", current=True)
    assert sum(r["images"] for r in counts.counts if r["class"] == "PNEUMONIA") == 5
    assert confirmed(pg, ids) == {ids[0], ids[1]}
    pg.engine.dispose()
