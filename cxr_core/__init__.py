"""cxr_core: the logic behind the chest X-ray pneumonia classifier workbench.

The package never imports streamlit; pages call into it.
"""
from __future__ import annotations

__version__ = "0.1.0"
