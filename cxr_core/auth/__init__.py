"""Who may do what: the policy (roles x actions, principals from OIDC claims or local mode),
the gate every checked action goes through (check, then audit in the action's own transaction)
and administration (role grants, the audit log).

Each domain keeps its own checked actions (``<domain>/actions.py``) that call :mod:`.gate`.
May import :mod:`cxr_core.storage` and :mod:`cxr_core.core`.
"""
