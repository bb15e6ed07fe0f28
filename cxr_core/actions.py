"""Every gated action, done as a principal: checked against the policy, then recorded.

Pages and the CLI call these, never the unchecked writers beneath them (a test of the pages'
source holds them to it), so hiding a widget is never the only guard. Each function:

1. checks :data:`cxr_core.auth.POLICY` (and ownership: own run / own relabel) for the
   principal; a refusal is written to the audit log (outcome ``denied``) and raised as
   :class:`~cxr_core.errors.PermissionDenied`;
2. does the action with the principal's identity as the recorded name (reviewer, sender,
   changed_by, created_by): never a typed name when sign-in is on;
3. appends an ``ok`` row to the audit log **in the action's own transaction** (the service
   functions take an ``and_then`` hook, :meth:`cxr_core.storage.Database.write`): the action
   and its row commit together or not at all. Side effects outside the database (starting a
   worker process) come after that commit.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cxr_core import auth, jobs
from cxr_core.auth import Principal
from cxr_core.errors import ConfigError, PermissionDenied, QuotaExceeded, RunError
from cxr_core.storage import AndThen, Database, lock_for_write
from cxr_core.storage import audit as store
from cxr_core.storage import jobs as job_store

# The action each job kind needs. Jobs that change state or read every record need their role;
# the rest compute a read-only view of what the pages show (split preview, comparison
# intervals, balance tables, agreement, a site-calibration candidate): ``compute_view``, every
# role, at most CXR_MAX_QUEUED_VIEW_JOBS queued or running per user, not audited when done.
JOB_ACTIONS = {"index": "index_dataset", "evaluate": "evaluate",
               "export_relabels": "export_relabels", "split_preview": "compute_view",
               "compare_ci": "compute_view", "balance_tables": "compute_view",
               "agreement": "compute_view", "site_calibration": "compute_view",
               "create_ensemble": "set_operating_point"}
VIEW_KINDS = tuple(k for k, a in JOB_ACTIONS.items() if a == "compute_view")


# -- Checking and recording -----------------------------------------------------------------

def record(db: Database, p: Principal, action: str, target: str = "", *,
           outcome: str = "ok", detail: Mapping[str, Any] | None = None) -> int:
    """Append one audit row (never updated or deleted)."""
    auth.allowed_roles(action)  # an unknown action is a bug, not a row
    return db.write(lambda s: store.add_event(session=s, actor=p.identity, source=p.source,
                                              action=action, target=target, outcome=outcome,
                                              detail=detail))


def _ok(p: Principal, action: str, target: str | Callable[[Any], str] = "",
        detail: Mapping[str, Any] | Callable[[Any], Mapping[str, Any]] | None = None) -> AndThen:
    """The hook that appends the ``ok`` audit row inside the action's transaction; ``target``
    and ``detail`` may be functions of the action's result (the new row's id)."""
    auth.allowed_roles(action)  # an unknown action is a bug, not a row

    def hook(session: Any, result: Any) -> None:
        store.add_event(session=session, actor=p.identity, source=p.source, action=action,
                        target=target(result) if callable(target) else target,
                        detail=detail(result) if callable(detail) else detail)
    return hook


def authorize(db: Database, p: Principal, action: str, target: str = "") -> None:
    """Raise PermissionDenied (and audit the refusal) unless ``p`` may do ``action``."""
    try:
        auth.require(p, action, target=target)
    except PermissionDenied as exc:
        record(db, p, action, target, outcome="denied", detail={"why": str(exc)})
        raise


def _authorize_owned(db: Database, p: Principal, *, owner: str | None, own: str, any_: str,
                     target: str) -> str:
    action = own if owner == p.identity else any_
    try:
        auth.require_owner_or(p, owner=owner, own_action=own, any_action=any_, target=target)
    except PermissionDenied as exc:
        record(db, p, action, target, outcome="denied", detail={"why": str(exc), "owner": owner})
        raise
    return action


def effective_principal(db: Database, user: Mapping[str, Any],
                        roles_config: Mapping[str, Any]) -> Principal:
    """The principal of a signed-in OIDC user: configured roles plus the admins' grants."""
    who = auth.identity_of(user)
    with db.session() as s:
        granted = store.granted_roles(session=s, identity=who)
    return auth.oidc_principal(user, roles_config, granted)


# -- Review ---------------------------------------------------------------------------------

def relabel(db: Database, p: Principal, *, choice: Any, image_id: int | None = None,
            upload_sha256: str | None = None, note: str = "", run_ref: str | None = None,
            score: float | None = None) -> int:
    from cxr_core import review

    target = f"image:{image_id}" if image_id is not None else f"upload:{upload_sha256}"
    authorize(db, p, "relabel", target)
    return review.submit_relabel(
        db, image_id=image_id, upload_sha256=upload_sha256, choice=choice, reviewer=p.identity,
        note=note, run_ref=run_ref, score=score,
        and_then=_ok(p, "relabel", lambda rid: f"relabel:{rid}",
                     {"on": target, "label": choice.label, "subtype": choice.subtype}))


def relabel_path(db: Database, p: Principal, *, dataset: str, relpath: str, label: str,
                 subtype: str | None = None, note: str = "") -> Any:
    """The CLI's ``relabel add``: one image named by its path, relabelled as ``p`` (never a
    typed name), the audit row in the relabel's transaction. Returns the RelabelRecord."""
    from cxr_core.relabel_import import relabel_by_path

    target = f"{dataset}:{relpath}"
    authorize(db, p, "relabel", target)
    return relabel_by_path(db, dataset=dataset, relpath=relpath, label=label, subtype=subtype,
                           reviewer=p.identity, note=note,
                           and_then=_ok(p, "relabel", lambda rid: f"relabel:{rid}",
                                        {"on": target, "label": label, "subtype": subtype}))


def undo_relabel(db: Database, p: Principal, *, relabel_id: int, note: str = "undo") -> int:
    from cxr_core import review

    with db.session() as s:
        owner = store.relabel_owner(session=s, relabel_id=relabel_id)
    if owner is None:
        raise ConfigError(f"no relabel with id {relabel_id}. Received: relabel_id={relabel_id}")
    action = _authorize_owned(db, p, owner=owner, own="undo_own_relabel",
                              any_="undo_any_relabel", target=f"relabel:{relabel_id}")
    return review.submit_undo(
        db, relabel_id=relabel_id, reviewer=p.identity, note=note,
        and_then=_ok(p, action, f"relabel:{relabel_id}",
                     lambda rid: {"undo_row": rid, "owner": owner}))


def send_to_review(db: Database, p: Principal, prediction: Any, *, model_ref: str) -> int:
    from cxr_core import uploads

    authorize(db, p, "send_to_review", model_ref)
    return uploads.send_to_review(
        db, prediction, model_ref=model_ref, sent_by=p.identity,
        and_then=_ok(p, "send_to_review", lambda item: f"review_item:{item}",
                     {"model": model_ref}))


def send_disagreement(db: Database, p: Principal, *, image_id: int, run_ref: str,
                      predicted: str, probs: Sequence[float]) -> int:
    from cxr_core import compare_service

    authorize(db, p, "send_to_review", f"image:{image_id}")
    return compare_service.send_disagreement_to_review(
        db, image_id=image_id, run_ref=run_ref, predicted=predicted, probs=probs,
        sent_by=p.identity, and_then=_ok(p, "send_to_review", lambda item: f"review_item:{item}",
                                         {"model": run_ref}))


# -- Runs -----------------------------------------------------------------------------------

def _check_run_request(db: Database, p: Principal, cfg: Any) -> None:
    """The role, the per-run limits and the user's active-run quota (a refusal is audited)."""
    from cxr_core import limits, run_data

    authorize(db, p, "train")
    lim = limits.Limits.from_env()
    try:
        # The images it would really train on (a whole-dataset run is judged by them too).
        n = run_data.count_training_images(db, cfg) if lim.max_train_images else None
        limits.check_run(cfg, lim, n_images=n)
        with db.session() as s:
            limits.check_active(store.count_active_runs(session=s, created_by=p.identity),
                                lim, p.identity)
    except Exception as exc:
        record(db, p, "train", outcome="denied", detail={"why": str(exc)})
        raise


def _train_ok(p: Principal, cfg: Any, name: str | None, **extra: Any) -> AndThen:
    return _ok(p, "train", lambda rid: f"run:{rid}",
               {"name": name or cfg.name, "model": getattr(cfg, "model", ""), **extra})


def start_run(db: Database, p: Principal, cfg: Any, *, name: str | None = None,
              start_worker: bool = True) -> tuple[int, int | None]:
    """Check the role, the per-run limits and the user's active-run quota; queue the run (its
    row, owner and audit row in one transaction), then make sure a worker serves it: (run id,
    local worker pid or None)."""
    from cxr_core import training_service

    _check_run_request(db, p, cfg)
    run_id = training_service.queue_run(db, cfg, name=name, created_by=p.identity,
                                        and_then=_train_ok(p, cfg, name))
    pid = None
    if start_worker:  # after the commit: a worker never sees a run without its audit row
        from cxr_core import worker
        pid = worker.ensure_worker(db)
    return run_id, pid


def train_here(db: Database, p: Principal, cfg: Any, *, name: str | None = None,
               progress: Any = None) -> Any:
    """The CLI's ``train`` without ``--detach``: the same checks as :func:`start_run`, then the
    run (owned by ``p``, its audit row in the run row's transaction) trains in this process.
    Returns the worker's RunOutcome."""
    from cxr_core import training_service

    _check_run_request(db, p, cfg)
    return training_service.run_in_process(db, cfg, name=name, progress=progress,
                                           created_by=p.identity,
                                           and_then=_train_ok(p, cfg, name, in_process=True))


def _run_owner(db: Database, run_id: int) -> str | None:
    from cxr_core import training_service

    if training_service.get_run(db, run_id) is None:
        raise RunError(f"no run with id {run_id}. Received: run_id={run_id}")
    with db.session() as s:
        return store.run_owner(session=s, run_id=run_id)


def cancel_run(db: Database, p: Principal, run_id: int) -> str:
    from cxr_core import training_service

    action = _authorize_owned(db, p, owner=_run_owner(db, run_id), own="cancel_own_run",
                              any_="cancel_any_run", target=f"run:{run_id}")
    return training_service.cancel_run(
        db, run_id, and_then=_ok(p, action, f"run:{run_id}",
                                 lambda status: {"status": status, "what": "cancel"}))


def resume_run(db: Database, p: Principal, run_id: int, *, start_worker: bool = True) -> None:
    from cxr_core import training_service

    action = _authorize_owned(db, p, owner=_run_owner(db, run_id), own="cancel_own_run",
                              any_="cancel_any_run", target=f"run:{run_id}")
    training_service.resume_run(db, run_id, start_worker=start_worker,
                                and_then=_ok(p, action, f"run:{run_id}", {"what": "resume"}))


# -- Operating points, presets, jobs --------------------------------------------------------

def set_manual_threshold(db: Database, p: Principal, *, run_id: int, threshold: float,
                         note: str = "", evaluation_id: int | None = None) -> Any:
    from cxr_core import operating_point_service as ops

    authorize(db, p, "set_operating_point", f"run:{run_id}")
    return ops.set_manual_threshold(
        db, run_id=run_id, threshold=threshold, changed_by=p.identity, note=note,
        evaluation_id=evaluation_id,
        and_then=_ok(p, "set_operating_point", f"run:{run_id}",
                     {"threshold": threshold, "note": note}))


def record_site_calibration(db: Database, p: Principal, candidate: Any, *,
                            note: str = "") -> Any:
    from cxr_core import site_calibration

    authorize(db, p, "site_calibration")
    return site_calibration.record(
        db, candidate, changed_by=p.identity, note=note,
        and_then=_ok(p, "site_calibration", lambda op: f"{op.model_ref}@dataset:{op.dataset_id}",
                     lambda op: {"threshold": op.threshold, "n": op.sample_n, "note": note}))


def create_ensemble(db: Database, p: Principal, name: str, members: Sequence[str], *,
                    threshold: float | None = None, note: str = "") -> Any:
    """A named ensemble fixes an operating point: ``set_operating_point``'s roles; made by
    ``p`` (never a typed name). The card is a write-once file, not a row, so its ``ok`` audit
    row follows the write. Returns the EnsembleInfo."""
    from cxr_core import ensembles

    target = f"ensemble:{name}"
    authorize(db, p, "set_operating_point", target)
    info = ensembles.create_ensemble(db, name, members, threshold=threshold,
                                     changed_by=p.identity, note=note)
    record(db, p, "set_operating_point", target,
           detail={"members": list(info.members), "threshold": info.threshold,
                   "source": info.threshold_source, "note": note})
    return info


def save_preset(db: Database, p: Principal, name: str, cfg: Any) -> None:
    from cxr_core import presets

    exists, owner = presets.owner(db, name)
    if exists:  # replacing someone else's preset (or one saved before sign-in): admins only
        _authorize_owned(db, p, owner=owner, own="save_preset", any_="overwrite_any_preset",
                         target=f"preset:{name}")
    else:
        authorize(db, p, "save_preset", f"preset:{name}")
    presets.save(db, name, cfg, created_by=p.identity,
                 and_then=_ok(p, "save_preset", f"preset:{name}"))


def submit_job(db: Database, p: Principal, kind: str, params: Mapping[str, Any], *,
               once: bool = True) -> int:
    """Queue a worker job as ``p``: each kind needs its action (:data:`JOB_ACTIONS`). Indexing
    checks the folder against the data roots first; view jobs are capped per user
    (:func:`_submit_view`). With ``once``, an open job with the same params is returned.

    Raises:
        ConfigError: an unknown kind.
        PermissionDenied, QuotaExceeded, PathNotAllowed: refused (and audited).
    """
    if kind not in JOB_ACTIONS:
        raise ConfigError(f"job kind must be one of {sorted(JOB_ACTIONS)}. "
                          f"Received: kind={kind!r}")
    action = JOB_ACTIONS[kind]
    authorize(db, p, action, kind)
    if kind == "index":
        from cxr_core import data_roots

        try:
            data_roots.check_path(params["path"], roots=data_roots.allowed_roots())
        except Exception as exc:
            record(db, p, action, str(params.get("path")), outcome="denied",
                   detail={"why": str(exc)})
            raise
    submit = jobs.submit_once if once else jobs.submit
    if action == "compute_view":
        return _submit_view(db, p, kind, params, submit)
    made: list[int] = []
    audit_row = _ok(p, action, lambda job_id: f"job:{job_id}", {"kind": kind, **dict(params)})

    def and_then(session: Any, job_id: int) -> None:  # in the job row's transaction
        made.append(job_id)
        audit_row(session, job_id)
    job = submit(db, kind, params, created_by=p.identity, and_then=and_then)
    if not made:  # an open job with these params was returned: nothing new to commit with
        record(db, p, action, f"job:{job}", detail={"kind": kind, "existing": True,
                                                    **dict(params)})
    return job


def _submit_view(db: Database, p: Principal, kind: str, params: Mapping[str, Any],
                 submit: Callable[..., int]) -> int:
    """A view job: read-only, so a success is not audited (every page view would be a row);
    a new one past the user's cap is refused, and that is. An open job with the same params
    (``submit_once``) is returned without counting."""
    from cxr_core import limits

    lim = limits.Limits.from_env()

    def cap(session: Any, job_id: int) -> None:  # in the new job's transaction
        lock_for_write(session)  # two tabs submitting at once count each other's job
        n = job_store.count_open_jobs(session=session, created_by=p.identity, kinds=VIEW_KINDS)
        limits.check_view_jobs(n - 1, lim, p.identity)  # n counts the new job itself
    try:
        return submit(db, kind, params, created_by=p.identity, and_then=cap)
    except QuotaExceeded as exc:
        record(db, p, "compute_view", kind, outcome="denied", detail={"why": str(exc)})
        raise


# -- Administration -------------------------------------------------------------------------

def grant_roles(db: Database, p: Principal, identity: str, roles: Sequence[str]) -> None:
    """An admin sets the roles granted to ``identity`` (added to the configured ones)."""
    identity = (identity or "").strip().lower()
    if not identity:
        raise ConfigError("a grant needs an identity (an email). Received: ''")
    bad = sorted(set(roles) - set(auth.ROLES))
    if bad:
        raise ConfigError(f"unknown role(s) {bad}. Expected some of {list(auth.ROLES)}")
    authorize(db, p, "manage_roles", identity)
    ordered = tuple(r for r in auth.ROLES if r in set(roles))
    db.write(lambda s: store.set_grant(session=s, identity=identity, roles=ordered,
                                       granted_by=p.identity),
             and_then=_ok(p, "manage_roles", identity, {"roles": list(ordered)}))


def role_grants(db: Database, p: Principal) -> list[store.RoleGrant]:
    authorize(db, p, "manage_roles")
    with db.session() as s:
        return store.list_grants(session=s)


def audit_log(db: Database, p: Principal, *, limit: int = 50, before_id: int | None = None,
              actor: str | None = None, action: str | None = None) -> list[store.AuditRecord]:
    """A page of the audit log, newest first (admins only)."""
    authorize(db, p, "view_audit")
    with db.session() as s:
        return store.list_events(session=s, limit=limit, before_id=before_id, actor=actor,
                                 action=action)
