"""Last in the suite (file name order): after every bad input, the killed worker, the app
restart and the concurrent reviewers, the suite's SQLite database is intact (issue 8)."""
from __future__ import annotations

import sqlite3

import pytest

pytestmark = pytest.mark.robustness


def test_suite_database_passes_integrity_check(db, robust_home):
    db.engine.dispose()  # close the suite's pooled connections first
    files = sorted(robust_home.glob("*.db"))
    assert files, f"no database under {robust_home}"
    for path in files:
        conn = sqlite3.connect(path)  # a plain connection, independent of SQLAlchemy
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], path
            assert conn.execute("PRAGMA foreign_key_check").fetchall() == [], path
        finally:
            conn.close()
