"""The foundation every package stands on: settings (environment and ``secrets.toml [cxr]``),
the one error family, resource limits and quotas, data roots, device discovery, the shared label
vocabulary and image records, and output safety (JSON, markdown/Plotly text, CSV cells).

Imports nothing of ours: every other package may import it.
"""
