"""Hyperparameter search (Ray Tune + Optuna TPE + ASHA) and the automated self-training loop,
in data-flow order:

* :mod:`bss.search.settings`      LoopSettings: every setting of the loop, its default and help
* :mod:`bss.search.space`         search-space YAML -> validated distributions
* :mod:`bss.search.searchers`     SEARCHERS: tpe, random, replicas
* :mod:`bss.search.fingerprint`   the dataset's fingerprint: image shape, defect thickness, box size
* :mod:`bss.search.plan`          the plan from it: scale, frame, whole frames or patches
* :mod:`bss.search.data_stage`    before any training: data, splits, box-only images, EVAL boxes
* :mod:`bss.search.trial`         the Tune trainable (one Trainer run, replayable)
* :mod:`bss.search.trial_store`   a trial's folder, record and rows (the only writer)
* :mod:`bss.search.tune_search`   the Tuner: searcher, scheduler, resources, restart
* :mod:`bss.search.tune_callback` the driver's per-trial lines and final trial states
* :mod:`bss.search.ray_cluster`   Ray: start or join a cluster, plan resources (the only ray.init)
* :mod:`bss.search.promotion`     PROMOTION_RULES: the iteration's model
* :mod:`bss.search.stop`          STOP_RULES: every stop, and whether the next H<n> is made
* :mod:`bss.search.stages`        search -> promote -> teacher -> decide -> next H<n>
* :mod:`bss.search.evaluate`      a checkpoint on a split (TEST), and its overlays
* :mod:`bss.search.final_report`  TEST of every promoted model, report, final model, summary
* :mod:`bss.search.report`        the final table and plot
* :mod:`bss.search.record`        LoopRecord: what state.json holds, as types
* :mod:`bss.search.state`         the atomic resume file and the run-dir lock
* :mod:`bss.search.loop`          the multi-iteration loop (``drivers/search.py``)

Nothing heavy is imported here; Ray workers import only what a trial needs.
"""
