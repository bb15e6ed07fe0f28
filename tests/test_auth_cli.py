"""The CLI acts as its configured local principal: gated, audited, and admin commands."""
from __future__ import annotations

import json

import pytest

from cxr_core.cli import main


def run(capsys, *argv):
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def test_cli_grants_roles_and_lists_the_audit_log(cxr_home, capsys, monkeypatch):
    monkeypatch.setenv("CXR_CLI_IDENTITY", "ops@h.org")
    code, out, _ = run(capsys, "roles", "grant", "Dr.Lee@H.org", "reviewer")
    assert code == 0 and out["grants"] == [{"identity": "dr.lee@h.org", "roles": ["reviewer"],
                                            "granted_by": "cli:ops@h.org"}]
    code, out, _ = run(capsys, "audit", "list")
    assert code == 0 and [(e["actor"], e["source"], e["action"], e["target"])
                          for e in out["events"]] == [("cli:ops@h.org", "cli", "manage_roles",
                                                       "dr.lee@h.org")]


def test_cli_with_fewer_roles_is_refused_and_the_refusal_recorded(cxr_home, capsys,
                                                                 monkeypatch, tiny_dataset):
    monkeypatch.setenv("CXR_CLI_IDENTITY", "viewer@h.org")
    monkeypatch.setenv("CXR_CLI_ROLES", "viewer")
    code, _, err = run(capsys, "index", str(tiny_dataset))
    assert code == 2 and "may not index dataset" in err and "scientist" in err
    code, _, err = run(capsys, "audit", "list")
    assert code == 2 and "may not view audit" in err
    monkeypatch.setenv("CXR_CLI_ROLES", "admin")
    code, out, _ = run(capsys, "audit", "list", "--action", "index_dataset")
    assert [(e["actor"], e["outcome"]) for e in out["events"]] == [("cli:viewer@h.org", "denied")]


@pytest.mark.parametrize("roles", ["viewer,reviewer", ""])
def test_cli_principal_roles_must_be_known(cxr_home, capsys, monkeypatch, roles):
    monkeypatch.setenv("CXR_CLI_ROLES", roles or "superuser")
    code, _, err = run(capsys, "audit", "list")
    assert code == 2 and ("may not view audit" in err if roles else "unknown role" in err)


def test_cli_train_goes_through_the_pages_checks_owner_and_audit(cxr_home, capsys, monkeypatch,
                                                                 tiny_dataset, tmp_path):
    """``train`` (in process or --detach) is the page's start_run: role, run limits, quota,
    created_by and the audit row; the worker never starts for a refused run."""
    from cxr_core.jobs import launcher
    from cxr_core.storage import open_db
    from cxr_core.storage import runs as store

    monkeypatch.setattr(launcher, "ensure_worker", lambda db, **kw: None)
    monkeypatch.setenv("CXR_CLI_IDENTITY", "ds@h.org")
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"recipe": "cpu128", "dataset": str(tiny_dataset),
                                  "image_size": 32, "epochs": 3, "calibration_fraction": 0}))
    monkeypatch.setenv("CXR_MAX_EPOCHS", "2")
    code, _, err = run(capsys, "train", "--config", str(config))
    assert code == 2 and "CXR_MAX_EPOCHS" in err and "3" in err
    monkeypatch.setenv("CXR_CLI_ROLES", "reviewer")
    code, _, err = run(capsys, "train", "--config", str(config), "--detach")
    assert code == 2 and "may not train" in err
    monkeypatch.delenv("CXR_CLI_ROLES")
    monkeypatch.delenv("CXR_MAX_EPOCHS")
    code, out, _ = run(capsys, "train", "--config", str(config), "--detach")
    assert code == 0 and out["status"] == "queued"
    db = open_db()
    with db.session() as s:
        [queued] = store.list_runs(session=s)
    assert queued.created_by == "cli:ds@h.org"
    monkeypatch.setenv("CXR_CLI_ROLES", "admin")
    code, out, _ = run(capsys, "audit", "list", "--action", "train")
    assert [(e["actor"], e["outcome"], e["target"]) for e in out["events"]] == [
        ("cli:ds@h.org", "ok", f"run:{queued.id}"), ("cli:ds@h.org", "denied", ""),
        ("cli:ds@h.org", "denied", "")]


def test_cli_index_is_logged_started_then_ok_or_failed_never_ok_for_failed_work(
        cxr_home, capsys, monkeypatch, tiny_dataset, tmp_path):
    """The CLI's audit rows say what happened: ``started`` before the work, then ``ok`` only
    when it finished, ``failed`` (with why) when it raised."""
    from cxr_core.data import indexing

    monkeypatch.setenv("CXR_CLI_IDENTITY", "ds@h.org")
    monkeypatch.setenv("CXR_DATA_ROOTS", f"{tiny_dataset.parent}:{tmp_path}")
    code, _, err = run(capsys, "index", str(tiny_dataset), "--name", "tiny")
    assert code == 0, err

    def boom(*a, **kw):
        raise FileNotFoundError("disk went away")

    monkeypatch.setattr(indexing, "index_dataset", boom)
    code, _, err = run(capsys, "index", str(tiny_dataset), "--name", "tiny")
    assert code == 2 and "disk went away" in err
    monkeypatch.setenv("CXR_CLI_ROLES", "admin")
    _, out, _ = run(capsys, "audit", "list", "--action", "index_dataset")
    got = [(e["actor"], e["outcome"]) for e in reversed(out["events"])]
    assert got == [("cli:ds@h.org", "started"), ("cli:ds@h.org", "ok"),
                   ("cli:ds@h.org", "started"), ("cli:ds@h.org", "failed")]
    assert "disk went away" in json.dumps(out["events"])
