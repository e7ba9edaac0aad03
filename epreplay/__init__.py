"""epreplay: record-and-replay debugger for expert-parallel (DeepEP) MoE instances.

Importing the package is cheap: torch, duckdb, textual and deep_ep are imported only by the
modules and commands that need them.
"""
from __future__ import annotations

__version__ = "0.1.0"
