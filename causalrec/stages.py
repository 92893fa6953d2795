"""The pipeline's stages, in order, with the Delta tables each reads and writes.

Each stage is a function ``run(ctx) -> dict`` (a summary of rows and numbers)
in the module named here; the CLI subcommand, ``jobs/<stage>.py`` and the
pipeline all call that same function. Modules are imported only when a stage
runs, so ``causalrec --help`` stays fast.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function"
    help: str
    inputs: tuple = ()
    outputs: tuple = ()
    engine: str = "spark"  # spark | ray | local

    def load(self):
        module, func = self.target.split(":")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("causalrec"):
                raise StageNotBuilt(f"stage {self.name!r} is not built yet ({module} is missing)") from exc
            raise
        return getattr(mod, func)


class StageNotBuilt(RuntimeError):
    pass


PIPELINE: tuple[Stage, ...] = (
    Stage("ingest", "causalrec.ingest.job:run",
          "load the configured data set (Coat, OBD, Amazon, simulator or files) into validated Delta tables",
          inputs=(), outputs=("events", "users", "items", "mcar_events", "ground_truth", "events_quarantine",
                              "dimension_quarantine", "ingest_log")),
    Stage("features", "causalrec.features.job:run",
          "point-in-time user, item and user-item feature tables",
          inputs=("events", "users", "items"), outputs=("user_features", "item_features")),
    Stage("propensity", "causalrec.propensity.job:run",
          "exposure and treatment propensities with calibration diagnostics",
          # mcar_events and ground_truth are optional (a missing table fingerprints as None)
          inputs=("events", "users", "items", "user_features", "item_features", "mcar_events", "ground_truth"),
          outputs=("exposure_propensity", "treatment_propensity", "propensity_diagnostics")),
    Stage("training_set", "causalrec.training_set:run",
          "join labels, features and propensities into training_examples (train/valid/test)",
          inputs=("events", "users", "items", "mcar_events", "user_features", "item_features", "exposure_propensity",
                  "treatment_propensity"),
          outputs=("training_examples", "id_index")),
    Stage("train", "causalrec.train.job:run",
          "fine-tune the recommender with a debiased objective on Ray Train",
          inputs=("training_examples",), outputs=("train_runs",), engine="ray"),
    Stage("candidates", "causalrec.candidates:run",
          "bounded candidate sets per user from several sources",
          inputs=("events", "items", "users", "user_features", "item_features", "exposure_propensity"),
          outputs=("candidates", "item_embeddings")),
    Stage("score", "causalrec.scoring:run",
          "score candidates with the trained checkpoint on Ray Data",
          inputs=("candidates", "train_runs", "events", "user_features", "item_features", "id_index", "users", "items",
                  "uplift_effects"), outputs=("scoring_input", "scores"),
          engine="ray"),
    Stage("recommend", "causalrec.ranking:run",
          "top-K recommendations by relevance, causal effect, blend or fair exposure, with explanations",
          # user_features and id_index: the served histories explanations cite; train_runs: the models' units;
          # item_embeddings: the text similarity that names the history item behind a recommendation
          inputs=("scores", "item_features", "items", "user_features", "id_index", "train_runs",
                  "uplift_effects", "item_embeddings"), outputs=("recommendations", "ranking_summary")),
    Stage("ope", "causalrec.ope.job:run",
          "off-policy evaluation of strategies with every estimator and intervals",
          # exposure_propensity: pi_b of a log without action propensities (Coat, the simulator)
          inputs=("events", "recommendations", "scores", "exposure_propensity"), outputs=("ope_results",)),
    Stage("evaluate", "causalrec.evaluation.job:run",
          "unbiased, causal, fairness and ranking metrics",
          # exposure / treatment propensities: the unbiased and causal metrics' weights; users: the fairness
          # groups; items, item_features: catalogue coverage and popularity groups; ground_truth (simulator)
          inputs=("training_examples", "id_index", "train_runs", "recommendations", "scores", "exposure_propensity",
                  "treatment_propensity", "users", "items", "item_features", "ground_truth"),
          outputs=("metrics",)),
    Stage("report", "causalrec.report:run",
          "single-file HTML report with plots plus a JSON of every number",
          inputs=("metrics", "ope_results", "train_runs", "propensity_diagnostics", "ranking_summary",
                  "uplift_effects"), outputs=(), engine="local"),
)

EXTRA: tuple[Stage, ...] = (
    Stage("doctor", "causalrec.doctor:run",
          "show the Spark master, Delta backend, Ray address and model path this config resolves to",
          engine="spark"),
    Stage("simulate", "causalrec.simulator:run",
          "generate a simulated logged world with known ground truth (any scale)",
          outputs=("events", "users", "items", "mcar_events", "ground_truth", "events_quarantine",
                   "dimension_quarantine", "ingest_log")),
    Stage("abtest", "causalrec.abtest:run",
          "A/B test analysis with CUPED variance reduction and a sample-ratio check",
          inputs=("events", "user_features"), outputs=("abtest_results",)),
    Stage("uplift", "causalrec.uplift:run",
          "causal effect of recommending: average, per item and per segment, with refutations",
          inputs=("events", "treatment_propensity", "users"), outputs=("uplift_effects",)),
)

ALL: dict[str, Stage] = {s.name: s for s in PIPELINE + EXTRA}


def writers_of(table: str) -> list[str]:
    """The stages that write ``table``, pipeline order first (``events``: ingest, then simulate)."""
    return [s.name for s in PIPELINE + EXTRA if table in s.outputs]
