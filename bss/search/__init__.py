"""Hyperparameter search (Ray Tune + Optuna TPE + ASHA) and the automated self-training loop.

* :mod:`bss.search.space`       search-space YAML -> validated distributions
* :mod:`bss.search.trial`       the Tune trainable (one Trainer run, replayable)
* :mod:`bss.search.tune_search` the Tuner: searcher, scheduler, resources, restart
* :mod:`bss.search.promotion`   the best trial under a floor (the guard)
* :mod:`bss.search.loop`        the multi-iteration loop (``drivers/search.py``)
* :mod:`bss.search.state`       the atomic resume file
* :mod:`bss.search.report`      the final table and plot
* :mod:`bss.search.evaluate`    a checkpoint on a split (TEST), and its overlays

Nothing heavy is imported here; Ray workers import only what a trial needs.
"""
