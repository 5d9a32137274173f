"""Searchers by name: how a search proposes its trials.

A searcher is a small class with one method, ``build(context, trials, points)``, returning what
the Tune ``Tuner`` needs: ``(search_alg, param_space, num_samples)``. Add one by writing a class
here and registering it in :data:`SEARCHERS` (its unit test: ``tests/test_search_space.py``).
"""

from __future__ import annotations

from bss.errors import BSSError


class Searcher:
    name = ""

    def build(self, context, trials: int, points: list[dict] | None):
        raise NotImplementedError


class OptunaSearcher(Searcher):
    """Optuna over the search space; subclasses choose the sampler."""

    def sampler(self, space, seed: int):
        raise NotImplementedError

    def build(self, context, trials: int, points: list[dict] | None):
        import warnings

        import optuna
        from ray.tune.search.optuna import OptunaSearch

        warnings.filterwarnings("ignore", module="optuna")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        space = context.space
        storage = study_storage(context.study)
        alg = OptunaSearch(
            space=space.optuna_space(),
            metric="search_score",
            mode="max",
            sampler=self.sampler(space, context.seed),
            points_to_evaluate=points or None,
            storage=storage,
            study_name=context.study["name"] if storage is not None else None,
        )
        return alg, None, trials


def study_storage(study: dict | None):
    """An Optuna RDB storage for ``study`` ({"storage", "name"}), emptied of an earlier study of
    that name: a restarted search starts its study afresh and replays its finished trials into
    it, so the searcher sees exactly what the first attempt saw (exact resume). None: in memory."""
    if not study:
        return None
    import optuna

    storage = optuna.storages.RDBStorage(study["storage"])
    if study["name"] in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
        optuna.delete_study(study_name=study["name"], storage=storage)
    return storage


class TPE(OptunaSearcher):
    """Optuna's TPE: ``n_startup_trials`` random trials, then the model (the space's ``searcher:``)."""

    name = "tpe"

    def sampler(self, space, seed: int):
        import optuna

        options = space.searcher
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=int(options["n_startup_trials"]),
            multivariate=bool(options["multivariate"]),
            constant_liar=True,  # concurrent trials: do not suggest the point a running trial holds
        )


class RandomSearch(OptunaSearcher):
    name = "random"

    def sampler(self, space, seed: int):
        import optuna

        return optuna.samplers.RandomSampler(seed=seed)


class Replicas(Searcher):
    """No search: ``trials`` copies of one fixed config, told apart by their seed (``replica``)."""

    name = "replicas"

    def build(self, context, trials: int, points: list[dict] | None):
        from ray import tune

        return None, {"replica": tune.grid_search(list(range(1, trials + 1)))}, 1


SEARCHERS: dict[str, Searcher] = {s.name: s for s in (TPE(), RandomSearch(), Replicas())}
SPACE_SEARCHERS = tuple(name for name, s in SEARCHERS.items() if isinstance(s, OptunaSearcher))  # --algorithm, searcher.algorithm


def get_searcher(name: str) -> Searcher:
    if name not in SEARCHERS:
        raise BSSError(f"unknown searcher {name!r}; choose one of: {', '.join(SEARCHERS)}.")
    return SEARCHERS[name]
