"""The foundation every package stands on: settings (environment and ``secrets.toml [cxr]``),
the one error family, resource limits and quotas, data roots, device discovery, the shared label
vocabulary and image records, output safety (JSON, markdown/Plotly text, CSV cells), and what
an app principal may name as a model (:mod:`.model_refs`).

Imports nothing of ours: every other package may import it.
"""
