"""Which box-only images to hand-label next, pre-annotated for VIA (issue 14).

* :mod:`bss.active.scores`   per-image scores from the teacher's probability, the box and the refined mask
* :mod:`bss.active.select`   ranking by a score, with near-duplicate frames suppressed
* :mod:`bss.active.suggest`  the teacher predicts the box-only images; ranking + pre-annotation files
* :mod:`bss.active.polygons` a mask -> simplified VIA polygons
* :mod:`bss.active.via_project` a VIA 2.0.10 project file (Project > Load)
* :mod:`bss.active.merge`    a VIA CSV export of the corrected images -> the dataset's labels.csv
* :mod:`bss.active.baseline` newly hand-labelled images -> NAME_BASELINE (EVAL/TEST unchanged)
"""
