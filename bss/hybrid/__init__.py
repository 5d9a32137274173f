"""Hybrid datasets ``<NAME>_H<n>``: coarse box masks refined by a trained model (see :mod:`bss.hybrid.make`)."""

from bss.hybrid.label_quality import LabelQuality, format_quality, measure_folder
from bss.hybrid.make import HybridResult, hybrid_name, make_hybrid, next_number, read_manifest
from bss.hybrid.refine import Refined, RefineRule, refine

__all__ = [
    "HybridResult",
    "LabelQuality",
    "RefineRule",
    "Refined",
    "format_quality",
    "hybrid_name",
    "make_hybrid",
    "measure_folder",
    "next_number",
    "read_manifest",
    "refine",
]
