"""Typed configuration: safe YAML files validated into dataclasses.

Why: every stage runs from one config file on a laptop and on a cluster, so a
typo must fail fast with the key, the file and what is allowed, never silently
fall back to a default. YAML is parsed with a ``yaml.SafeLoader`` (no tags that
construct objects, so a config can never execute code) that keeps dates as strings
for the checks to name a bad one's key. Relative paths resolve from the working
directory, as spark-submit's do.

Overrides come from the command line as ``--set section.key=value`` where the
value is parsed as a YAML scalar/flow value (``--set train.epochs=3``,
``--set train.baseline_objectives=[naive,ips]``).
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

log = logging.getLogger(__name__)
MIN_BOOTSTRAP_BUCKETS = 100  # ope.bootstrap_buckets: the fewest hashed buckets a bucketed bootstrap may use


class ConfigError(ValueError):
    """A config file or override is invalid; the message names key, file and what is allowed."""


# --------------------------------------------------------------------------- sections


@dataclass
class ProjectConfig:
    name: str = "causalrec"
    seed: int = 42


@dataclass
class StorageConfig:
    """Where Delta tables live: ``<root>/<table_name>`` (local folder or object store URI)."""

    root: str = "./causalrec_data"
    backend: Literal["auto", "delta-spark", "delta-rs"] = "auto"
    checkpoint_dir: Optional[str] = None  # default: <root>/_checkpoints
    reports_dir: Optional[str] = None  # default: <root>/_reports


@dataclass
class SparkConfig:
    master: str = "local[*]"  # ignored when spark-submit already set one
    app_name: str = "causalrec"
    driver_memory: str = "4g"
    shuffle_partitions: int = 8
    ui_enabled: bool = False
    conf: dict = field(default_factory=dict)


@dataclass
class RayConfig:
    address: Optional[str] = None  # None = start local Ray; "auto" or ray://host:port for a cluster
    num_cpus: Optional[int] = None
    temp_dir: Optional[str] = None  # default: <system temp>/causalrec-ray
    object_store_memory_mb: Optional[int] = None


@dataclass
class DataConfig:
    """Which data set to load and where its raw files are."""

    source: Literal["coat", "obd", "amazon", "simulator", "files"] = "coat"
    path: str = "../shared/data/coat"
    # files source: a parquet/csv/jsonl file or folder, or a Delta table path
    format: Literal["parquet", "csv", "jsonl", "delta"] = "parquet"
    # files source: the users and items tables, in data.format, with their table's columns (users:
    # user_id, attributes, text, segment; items: item_id, attributes, category, text, price; only the
    # id is required). Unset: the ids the events hold, with no attributes or text.
    users_path: Optional[str] = None
    items_path: Optional[str] = None
    rating_min: float = 1.0
    rating_max: float = 5.0
    event_types: list[str] = field(
        default_factory=lambda: ["impression", "click", "purchase", "rating", "view", "add_to_cart"]
    )
    require_known_users: bool = False
    require_known_items: bool = False
    earliest_time: str = "2000-01-01"
    latest_time: str = "2100-01-01"
    obd_campaigns: list[str] = field(default_factory=lambda: ["all", "men", "women"])
    obd_policies: list[str] = field(default_factory=lambda: ["random", "bts"])


@dataclass
class SimulatorConfig:
    n_users: int = 2000
    n_items: int = 500
    n_events: int = 100_000
    n_latent: int = 8
    popularity_bias: float = 1.0  # exponent on item popularity in exposure
    selection_on_preference: float = 1.0  # how strongly exposure depends on true preference
    logging_policy: Literal["uniform", "popularity", "epsilon_greedy", "softmax"] = "softmax"
    epsilon: float = 0.1
    softmax_temperature: float = 1.0
    base_purchase_rate: float = 0.05
    ate: float = 0.03  # configured average treatment effect of recommending
    effect_heterogeneity: float = 1.0
    recommend_rate: float = 0.3
    mcar_share: float = 0.05  # share of users in the randomised-exposure slice
    n_days: int = 30
    partitions: int = 8
    exposure_rate: float = 0.5  # target mean P(pair observed) before clipping at 1
    mcar_items_per_user: int = 16  # random items shown to each user of the MCAR slice
    n_positions: int = 5  # slate size: recommended impressions get a position 1..n_positions
    start_date: str = "2024-01-01"  # first day of simulated event times (UTC)


@dataclass
class FeaturesConfig:
    cutoff: Optional[str] = None  # ISO timestamp; None = after the last event
    windows_days: list[int] = field(default_factory=lambda: [7, 30, 365])
    history_length: int = 20
    smoothing_prior_strength: float = 10.0
    popularity_groups: list[float] = field(default_factory=lambda: [0.2, 0.5])  # head = top 20%, mid = next 30%
    max_attribute_features: int = 256  # one-hot attribute tokens in feature_vector (most frequent first)


@dataclass
class PropensityConfig:
    exposure_method: Literal["popularity", "naive_bayes", "logistic"] = "logistic"
    popularity_power: float = 0.5
    clip_min: float = 0.01
    self_normalize: bool = False
    treatment_method: Literal["logged", "logistic", "gbt", "choice"] = "logged"
    treatment_eps: float = 0.01
    # choice: P(item chosen for a slot) of a slate policy, one multinomial model per group
    choice_groups: list[str] = field(default_factory=lambda: ["policy", "context.campaign"])  # column / context.<key>
    choice_time_buckets: int = 48  # one-hot time buckets over each group's span (a learning policy drifts)
    choice_reg_grid: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2])  # picked by held-out log-loss
    choice_user_features: bool = False  # add the user feature vector to the choice model
    choice_eps: float = 0.001  # clip floor for choice probabilities (they are ~1/catalogue size)
    calibration_bins: int = 10
    holdout_fraction: float = 0.2  # pairs held out for calibration diagnostics
    reg_param: float = 0.01  # MLlib LR L2 strength
    max_iter: int = 25  # MLlib LR / GBT iterations
    compare_methods: list[str] = field(default_factory=list)  # extra exposure methods to diagnose beside exposure_method
    adjustment_set: Optional[list[str]] = None  # feature groups; None = derived from causal_graph


# the training_set settings that decide which labels are held out, and so what a model may see
# (causalrec.training_set.split_settings; the propensity stage's fingerprint, causalrec.pipeline)
SPLIT_SETTINGS = ("split", "valid_fraction", "test_fraction", "mcar_valid_fraction", "label_event_type")

# feature groups a propensity model may adjust for (``propensity.adjustment_set``): the keys of
# causalrec.propensity.job.GROUP_COLUMNS, kept here so loading a config imports no Spark code
# (tests/test_config_cli.py checks the two agree)
ADJUSTMENT_GROUPS = ("user_features", "item_features")


@dataclass
class TrainingSetConfig:
    split: Literal["given", "time", "random_user"] = "given"
    valid_fraction: float = 0.1
    mcar_valid_fraction: float = 0.0  # share of MCAR pairs moved from test to valid (unbiased selection)
    test_fraction: float = 0.2
    files_per_split: int = 2  # a multiple of train.num_workers
    unobserved_per_observed: float = 1.0  # sampled unobserved pairs for DR joint learning
    positive_threshold: float = 4.0  # rating >= this counts as a positive outcome
    label_event_type: Optional[str] = None  # None = first present of rating, impression, purchase, click


@dataclass
class TrainConfig:
    model: Literal["mf", "two_tower", "cross_encoder"] = "mf"
    objective: Literal["naive", "ips", "snips", "dr_jl", "uplift"] = "ips"
    # also trained (before the main objective) so evaluation/report compare naive vs debiased
    baseline_objectives: list[str] = field(default_factory=list)
    task: Literal["rating", "click"] = "rating"
    model_path: Optional[str] = None  # local HF encoder folder; None = bundled all-MiniLM-L6-v2
    embedding_dim: int = 32
    epochs: int = 10
    batch_size: int = 256
    learning_rate: float = 0.01
    weight_decay: float = 1e-4
    max_seq_len: int = 64
    num_workers: int = 2
    cpus_per_worker: float = 0.5
    use_gpu: bool = False
    max_failures: int = 1
    early_stopping_patience: int = 3
    ips_clip: float = 0.01
    # DR joint learning: weight of the imputation model's IPS-weighted fit to the observed labels
    # (0 = the paper's error fit alone; see causalrec.train.objectives.DRJointLearning)
    dr_label_fit_weight: float = 1.0
    mlflow_tracking_uri: Optional[str] = None
    tune_trials: int = 0
    freeze_encoder: bool = False
    freeze_layers: int = 0  # freeze the encoder's embeddings + this many lowest layers (-1: all)
    encoder_lr: Optional[float] = None  # learning rate of the pre-trained encoder (None: min(learning_rate, 5e-5))
    id_dropout: float = 0.1  # text models: share of ids replaced by the unknown row (cold-start training)
    # text models: feed each numeric feature as a z-score under the train split's moments (one Ray Data
    # pass before training; causalrec.models.feature_scaling); false feeds the raw values
    standardize_features: bool = True
    # two-tower: add text_scale * cos(user text, item text) on the encoder's own vectors to the logit
    # None: on for task=click (implicit feedback: the zero-shot similarity is the signal, and cold
    # items need it), off for rating regression (how much a user likes what they chose to rate)
    text_match: Optional[bool] = None
    text_match_init: Optional[float] = None  # text_scale's start; None: 5.0 for task=click, 1.0 for ratings
    valid_metric: Literal["auto", "ips", "mcar", "naive"] = "auto"  # auto: mcar when valid has MCAR rows
    bf16: bool = True  # autocast on GPU
    prefetch_batches: int = 2
    torch_threads: Optional[int] = None  # per worker; None: max(1, cpus_per_worker rounded)
    resume_from: Optional[str] = None  # checkpoint folder to continue from
    tune_max_concurrent: int = 1
    tune_grace_epochs: int = 1  # ASHA: epochs before a trial may be stopped
    # same data order on every run (Ray Data preserve_order for the worker shards) and torch's
    # deterministic kernels: a rerun reproduces the model bit for bit on CPU; false trades that for
    # streaming throughput on large clusters
    deterministic: bool = True


@dataclass
class CandidatesConfig:
    per_source: int = 50
    max_candidates: int = 100
    exclude_consumed: bool = True
    sources: list[str] = field(default_factory=lambda: ["popularity", "cooccurrence", "affinity", "text"])
    neighbours_per_item: int = 50  # co-occurrence / text neighbours kept per item
    cold_item_max_events: int = 5  # items with at most this many positive (user, item) pairs get text candidates
    text_cold_only: bool = True  # text source proposes only cold items (False: any text neighbour)


@dataclass
class ScoringConfig:
    batch_size: int = 1024
    num_actors: int = 2
    cpus_per_actor: float = 0.5
    use_gpu: bool = False
    run_id: Optional[str] = None  # train_runs.run_id to score with; None = the latest run


@dataclass
class RankingConfig:
    k: int = 10
    policy: Literal["relevance", "uplift", "blend", "fair"] = "blend"
    blend_weight: float = 0.5  # weight on uplift in the blend
    fairness_strength: float = 0.5
    fairness_attribute: str = "popularity_group"
    fair_base_policy: Literal["relevance", "uplift", "blend"] = "blend"  # score the fair re-ranker starts from
    fairness_target: Literal["catalogue", "equal"] = "catalogue"  # group's share of items, or 1/G per group


@dataclass
class OPEConfig:
    estimators: list[str] = field(
        default_factory=lambda: ["ips", "clipped_ips", "snips", "dm", "dr", "sndr", "switch_dr", "dr_os"]
    )
    strategies: list[str] = field(default_factory=lambda: ["random", "popular", "recommendations"])
    baseline: str = "random"
    bootstrap_replicates: int = 200
    # 0: a Poisson weight per row (exact, B weights per row); G > 0: rows hashed into G buckets that
    # share a weight - the same bootstrap for i.i.d. rows at a fraction of the cost (event scale)
    bootstrap_buckets: int = 0
    alpha: float = 0.05
    clip_max_weight: float = 100.0
    switch_dr_lambdas: list[float] = field(default_factory=lambda: [1.0, 2.0, 5.0, 10.0, 50.0, 100.0, float("inf")])
    dr_os_lambdas: list[float] = field(default_factory=lambda: [1.0, 10.0, 100.0, 1000.0, 10000.0, float("inf")])
    # how Switch-DR and DRos pick lambda from their grid: "slope" (SLOPE++, obp's default) or
    # "mse" (estimated variance + squared bias upper bound)
    tuning_method: Literal["mse", "slope"] = "slope"
    # reward of a logged decision (impression): None = the impression's value (OBD, simulator: the
    # click); an event type (e.g. "purchase") = the summed value of that decision's events of the type
    reward_event: Optional[str] = None
    # what events.logged_propensity is: "action" = the logging policy's probability of the shown item
    # at its slot (OBD), the strategies' action space; "treatment" = of a recommend-or-not decision
    # (the simulator), which OPE over items cannot use: the exposure propensities are pi_b instead
    logged_propensity: Literal["action", "treatment"] = "action"
    # A/B test analysis (causalrec abtest): arms are the values of events.<abtest_arm_column>
    abtest_arm_column: str = "policy"
    abtest_treatment: Optional[str] = None  # default: the last arm in sort order
    abtest_control: Optional[str] = None  # default: the first arm in sort order
    # experiment start (ISO); every earlier event, arm-labelled or not, is pre-period; None = first arm-labelled event
    abtest_start: Optional[str] = None
    abtest_covariate: Optional[str] = None  # a user_features column as CUPED covariate instead of the pre-period
    abtest_metric_event: Optional[str] = None  # only events of this type count (None = all)
    abtest_expected_share: float = 0.5  # designed share of units in the treatment arm (SRM check)
    # uplift (causalrec uplift): treatment = events.recommended, outcome = value of outcome events
    # the uplift stage's outcome of a decision (an impression with a recommended flag): None = its own
    # value (the click); an event type (e.g. "purchase") = that type's summed value, same user/item/session
    uplift_outcome_event: Optional[str] = None
    # both outcome events above (reward_event, uplift_outcome_event) go to the latest decision of the
    # same keys at or before them; with this set, only if at most this many seconds after it
    # (None = no window; causalrec/decisions.py)
    attribution_window_s: Optional[float] = None
    # the keys: "session" = same user, item and session (OPE: and slot), so an outcome in another
    # session counts for no decision; "user" = same user and item in any session and slot (a purchase
    # the next day in a new session goes to the latest impression before it; the outcome's position
    # is ignored, the decision keeps its slot). Pair "user" with attribution_window_s to bound the age
    attribution_scope: Literal["session", "user"] = "session"
    uplift_min_rows: int = 30  # per-item / per-segment cells with fewer treated or fewer control rows are not reported
    uplift_refutation_sample: float = 0.2  # share of rows used by the refutation checks
    uplift_refutation_max_rows: int = 1_000_000  # ... and at most this many: they are fitted on the driver


@dataclass
class EvaluationConfig:
    k: list[int] = field(default_factory=lambda: [5, 10])
    report_title: str = "causalrec report"
    relevance_threshold: Optional[float] = None  # rating >= this is relevant; None = training_set.positive_threshold
    user_group_attribute: str = "segment"  # users.segment, or an attribute name such as "gender" ('gender:women')
    calibration_bins: int = 10
    propensity_clip: float = 0.01  # floor on propensities in IPS/SNIPS-weighted metrics
    models: list[str] = field(default_factory=list)  # objectives to evaluate from train_runs; empty = latest run of each


@dataclass
class CausalGraphConfig:
    """Assumed causal graph: edges as "parent -> child" strings; node names are feature groups."""

    edges: list[str] = field(
        default_factory=lambda: [
            "user_features -> exposure",
            "item_features -> exposure",
            "user_features -> recommended",
            "item_features -> recommended",
            "user_features -> outcome",
            "item_features -> outcome",
            "recommended -> exposure",
            "exposure -> outcome",
            "recommended -> outcome",
        ]
    )


@dataclass
class Config:
    project: ProjectConfig = field(default_factory=ProjectConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    data: DataConfig = field(default_factory=DataConfig)
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    propensity: PropensityConfig = field(default_factory=PropensityConfig)
    training_set: TrainingSetConfig = field(default_factory=TrainingSetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    candidates: CandidatesConfig = field(default_factory=CandidatesConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    ope: OPEConfig = field(default_factory=OPEConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    causal_graph: CausalGraphConfig = field(default_factory=CausalGraphConfig)
    source_file: Optional[str] = None  # set by load_config, not a YAML key

    def table_path(self, name: str) -> str:
        return f"{self.storage.root.rstrip('/')}/{name}"

    @property
    def checkpoint_dir(self) -> str:
        return self.storage.checkpoint_dir or f"{self.storage.root.rstrip('/')}/_checkpoints"

    @property
    def reports_dir(self) -> str:
        return self.storage.reports_dir or f"{self.storage.root.rstrip('/')}/_reports"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source_file", None)
        return d


# --------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted where floats are expected, and so are
    decimal strings such as ``1e-3`` (YAML 1.1 reads those as strings)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where}: got {value!r}, expected {_type_name(tp)}")
    if origin is list:  # list[float] etc.: each element as its type (YAML reads 1e-3 as a string)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: got {value!r} ({type(value).__name__}), expected {_type_name(tp)}")
        (elem,) = typing.get_args(tp)
        return [_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: got {value!r}, expected {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: got {value!r}, expected null")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads a float without a dot (1e-3, 2E5) as a string: take the number it spells
        # (digits, sign, dot and exponent only: no nan, inf or words)
        if isinstance(value, str) and value.strip() and set(value.strip()) <= set("0123456789+-.eE"):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (datetime.date, datetime.datetime)):  # YAML reads unquoted 2024-01-01 as a date
            return value.isoformat()
    elif tp is list:
        if isinstance(value, list):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    else:  # pragma: no cover - every annotation above is covered
        return value
    raise ConfigError(f"{where}: got {value!r} ({type(value).__name__}), expected {_type_name(tp)}")


def _build(cls: type, data: dict, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source_file"}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            full = f"{where}.{key}" if where else key
            raise ConfigError(f"unknown key {full!r}; allowed keys{' in ' + where if where else ''}: {allowed}")
        tp = hints[key]
        sub = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, sub)
        else:
            kwargs[key] = _coerce(value, tp, sub)
    return cls(**kwargs)


# Plain numbers checked at load, so a value that would fail late or mislead silently (a negative
# learning rate, no candidate per user, a zero-width popularity group) fails naming its key.
# "key[]": every element of a list, which must not be empty; None (an unset optional) passes.
NUMBER_RANGES = {
    "spark.shuffle_partitions": "int >= 1",
    "ray.num_cpus": "int >= 1",
    "ray.object_store_memory_mb": "int >= 1",
    "features.windows_days[]": "int >= 1",
    "features.history_length": "int >= 1",
    "features.smoothing_prior_strength": ">= 0",
    "features.popularity_groups[]": "(0, 1]",
    "features.max_attribute_features": "int >= 0",
    "propensity.clip_min": "(0, 1)",
    "propensity.treatment_eps": "(0, 0.5)",
    "propensity.choice_eps": "(0, 0.5)",
    "propensity.choice_reg_grid[]": ">= 0",  # L2 strengths
    "propensity.holdout_fraction": "[0, 1)",  # the rest of the rows is what the models are fitted on
    "propensity.popularity_power": ">= 0",
    "propensity.choice_time_buckets": "int >= 1",
    "propensity.calibration_bins": "int >= 1",
    "propensity.reg_param": ">= 0",
    "propensity.max_iter": "int >= 1",
    "training_set.valid_fraction": "[0, 1)",
    "training_set.mcar_valid_fraction": "[0, 1)",
    "training_set.test_fraction": "[0, 1)",
    "training_set.files_per_split": "int >= 1",
    "training_set.unobserved_per_observed": ">= 0",
    "train.embedding_dim": "int >= 1",
    "train.epochs": "int >= 1",
    "train.batch_size": "int >= 1",
    "train.learning_rate": "> 0",
    "train.encoder_lr": "> 0",
    "train.weight_decay": ">= 0",
    "train.max_seq_len": "int >= 2",  # the tokenizer's [CLS] and [SEP]
    "train.num_workers": "int >= 1",
    "train.cpus_per_worker": "> 0",
    "train.max_failures": "int >= -1",  # Ray's -1: retry without limit
    "train.early_stopping_patience": "int >= 0",  # 0: no early stopping
    "train.ips_clip": "(0, 0.5)",  # a propensity floor; the uplift arms clip e to [clip, 1 - clip]
    "train.dr_label_fit_weight": ">= 0",
    "train.tune_trials": "int >= 0",
    "train.freeze_layers": "int >= -1",  # -1: the whole encoder
    "train.id_dropout": "[0, 1)",
    "train.prefetch_batches": "int >= 0",
    "train.torch_threads": "int >= 1",
    "train.tune_max_concurrent": "int >= 1",
    "train.tune_grace_epochs": "int >= 1",
    "candidates.per_source": "int >= 1",
    "candidates.max_candidates": "int >= 1",
    "candidates.neighbours_per_item": "int >= 1",
    "candidates.cold_item_max_events": "int >= 0",
    "scoring.batch_size": "int >= 1",
    "scoring.num_actors": "int >= 1",
    "scoring.cpus_per_actor": "> 0",
    "ranking.k": "int >= 1",
    "ranking.fairness_strength": "[0, 1]",
    "ranking.blend_weight": "[0, 1]",  # above 1 the blend rewards low relevance, below 0 low effects
    "ope.bootstrap_replicates": "int >= 0",  # 0: point estimates without intervals
    "ope.clip_max_weight": "> 0",
    "ope.switch_dr_lambdas[]": ">= 0",
    "ope.dr_os_lambdas[]": ">= 0",
    "ope.abtest_expected_share": "(0, 1)",  # the sample-ratio check divides by both arms' shares
    "ope.uplift_refutation_sample": "(0, 1]",
    "ope.uplift_refutation_max_rows": "int >= 20",
    # each reported item or segment effect needs that many treated and control rows: below 2 an arm
    # may be missing or have no standard error
    "ope.uplift_min_rows": "int >= 2",
    "evaluation.calibration_bins": "int >= 1",
    "evaluation.propensity_clip": "(0, 1)",
}
_BOUND = re.compile(r"(int )?(>=|>) (-?[0-9.]+)$")
_INTERVAL = re.compile(r"([\[(])(-?[0-9.]+), (-?[0-9.]+)([\])])$")


def _in_range(value, spec: str) -> bool:
    """Whether ``value`` lies in ``spec``: "int >= 1", "> 0", ">= 0" or an interval such as "[0, 1)"."""
    bound = _BOUND.match(spec)
    if bound:
        low = float(bound.group(3))
        return value > low or (bound.group(2) == ">=" and value == low)
    opening, low, high, closing = _INTERVAL.match(spec).groups()
    low, high = float(low), float(high)
    return ((value > low or (opening == "[" and value == low))
            and (value < high or (closing == "]" and value == high)))


def _allowed(spec: str) -> str:
    """``spec`` in words, for the "expected ..." half of an out-of-range message."""
    if spec.startswith("int "):
        return f"an integer {spec[4:]}"
    return f"a number {spec}" if spec[0] in "<>" else f"a value in {spec}"


def _check_ranges(cfg: Config, bad) -> None:
    """:data:`NUMBER_RANGES` against ``cfg``; ``bad(key, message)`` raises."""
    for key, spec in NUMBER_RANGES.items():
        section, name = key.rstrip("[]").split(".")
        value = getattr(getattr(cfg, section), name)
        if key.endswith("[]"):
            if not value:
                bad(key[:-2], f"got {value}, expected a non-empty list, each element {_allowed(spec)}")
            for i, v in enumerate(value):
                if not _in_range(v, spec):
                    bad(f"{key[:-2]}[{i}]", f"got {v}, expected {_allowed(spec)}")
        elif value is not None and not _in_range(value, spec):
            bad(key, f"got {value}, expected {_allowed(spec)}")


def iso_utc(value, key: str) -> datetime.datetime:
    """An aware UTC datetime from an ISO date/time string or a datetime (one without a zone is UTC); a
    ValueError naming ``key`` otherwise. Every configured time (cutoffs, start dates, ingest bounds) goes
    through here, so the config check and the stage that reads the value agree."""
    if isinstance(value, datetime.datetime):
        t = value
    else:
        try:
            t = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{key}: got {value!r}, expected an ISO date/time such as 2024-01-01 or "
                             "2024-01-01T00:00:00Z") from None
    return t.astimezone(datetime.timezone.utc) if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)


def _check_semantics(cfg: Config, where: str) -> None:
    def bad(key: str, msg: str) -> None:
        raise ConfigError(f"{where}: {key}: {msg}")

    _check_ranges(cfg, bad)
    if not str(cfg.storage.root).strip():  # an orchestrator's template that rendered empty: not the cwd
        bad("storage.root", "is empty; expected a directory or URI for the Delta tables (relative paths "
                            "resolve from the working directory)")
    groups = cfg.features.popularity_groups
    if len(groups) != 2 or not groups[0] < groups[1]:
        bad("features.popularity_groups", f"got {groups}, expected two cumulative shares 0 < head < mid <= 1 "
                                          "(head: the top head share of items; mid: up to the mid share)")
    # the exposure_method choices are the estimator registry's keys (tests/test_config_cli.py checks it)
    exposure_methods = typing.get_args(typing.get_type_hints(PropensityConfig)["exposure_method"])
    for m in cfg.propensity.compare_methods or []:
        if m not in exposure_methods:
            bad("propensity.compare_methods", f"{m!r} is not one of {list(exposure_methods)}")
    for g in cfg.propensity.adjustment_set or []:
        if g not in ADJUSTMENT_GROUPS:
            bad("propensity.adjustment_set", f"{g!r} is not one of {list(ADJUSTMENT_GROUPS)}")
    if cfg.training_set.files_per_split % cfg.train.num_workers != 0:
        bad(
            "training_set.files_per_split",
            f"got {cfg.training_set.files_per_split}, expected a multiple of train.num_workers "
            f"({cfg.train.num_workers}) so Ray Train shards evenly",
        )
    allowed_objectives = typing.get_args(typing.get_type_hints(TrainConfig)["objective"])
    for obj in cfg.train.baseline_objectives:
        if obj not in allowed_objectives:
            bad("train.baseline_objectives", f"{obj!r} is not one of {list(allowed_objectives)}")
    ts = cfg.training_set
    if ts.split != "given" and ts.valid_fraction + ts.test_fraction >= 1:
        bad("training_set.test_fraction", f"valid_fraction + test_fraction = {ts.valid_fraction + ts.test_fraction:g}, "
            f"expected < 1 with split={ts.split!r}: the rest of the labelled events is the train split")
    if not cfg.evaluation.k or any(k < 1 for k in cfg.evaluation.k):
        bad("evaluation.k", f"got {cfg.evaluation.k}, expected a non-empty list of cut-offs >= 1")
    if cfg.ope.baseline not in cfg.ope.strategies:  # the diff_to_baseline columns would silently stay empty
        bad("ope.baseline", f"got {cfg.ope.baseline!r}, expected one of ope.strategies {cfg.ope.strategies}")
    if cfg.data.rating_min >= cfg.data.rating_max:
        bad("data.rating_min", "must be below data.rating_max")
    if not cfg.data.event_types:
        bad("data.event_types", "got [], expected a non-empty list (every event would be quarantined)")
    times = {}  # checked here, not when a stage first reads them: `causalrec run` fails before any stage
    for section, key in (("data", "earliest_time"), ("data", "latest_time"), ("features", "cutoff"),
                         ("simulator", "start_date"), ("ope", "abtest_start")):
        value = getattr(getattr(cfg, section), key)
        if value is None:
            continue
        try:
            times[key] = iso_utc(value, f"{section}.{key}")
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if times["earliest_time"] >= times["latest_time"]:
        bad("data.earliest_time", f"{cfg.data.earliest_time} is not before data.latest_time {cfg.data.latest_time} "
                                  f"(every event would be out of range)")
    if not 0 < cfg.ope.alpha < 1:  # a z of alpha / 2: 0.95 for "95%" gave intervals 30 times too narrow
        bad("ope.alpha", f"got {cfg.ope.alpha}, expected the miss rate in (0, 1): 0.05 for 95% intervals")
    if cfg.ope.alpha > 0.5:
        log.warning("%s: ope.alpha is %s: intervals at %.0f%% confidence (0.05 gives 95%%)", where, cfg.ope.alpha,
                    100 * (1 - cfg.ope.alpha))
    g = cfg.ope.bootstrap_buckets
    if g != 0 and g < MIN_BOOTSTRAP_BUCKETS:
        bad("ope.bootstrap_buckets", f"got {g}, expected 0 (a Poisson weight per row) or at least "
            f"{MIN_BOOTSTRAP_BUCKETS}: each bucket is one resampling unit, and with few the interval is noise "
            "(1 gives a zero-width one; conf/cluster.yaml uses 4096)")
    w = cfg.ope.attribution_window_s
    if w is not None and not 0 < w < float("inf"):  # also refuses nan
        bad("ope.attribution_window_s", f"got {w}, expected a finite number of seconds > 0 (null: no window)")
    for e in cfg.causal_graph.edges:
        if not isinstance(e, str) or "->" not in e:
            bad("causal_graph.edges", f"edge {e!r} must read 'parent -> child'")


class _ConfigLoader(yaml.SafeLoader):
    """Safe YAML that keeps dates and timestamps as strings: a bad one (``2024-02-30``) then reaches
    :func:`_check_semantics`, which names its key, instead of failing in the parser without one."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def _yaml(text: str):
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass


def _yaml_reason(exc: yaml.YAMLError) -> str:
    """One line: where (line and column, 1-based) and what, for the CLI's one-line errors."""
    mark = getattr(exc, "problem_mark", None)
    what = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark is not None else what


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=3"`` -> (["train", "epochs"], 3); the value is parsed as safe YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.epochs=3")
    key, raw = text.split("=", 1)
    try:
        value = _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        reason = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
        raise ConfigError(f"--set {key.strip()}: value {raw!r} is not valid YAML ({reason}); "
                          f"expected a YAML scalar or flow value (quote a string)") from None
    return key.strip().split("."), value


def _apply_override(data: dict, path: list[str], value: Any) -> None:
    """Set ``value`` at ``path`` in the raw config mapping.

    Once the path reaches a dict-typed field (``spark.conf``), the rest of the path, joined with dots,
    is one key of that mapping: ``spark.conf.spark.sql.adaptive.enabled`` sets the Spark key
    ``spark.sql.adaptive.enabled``, not nested sections.
    """
    node, cls = data, Config
    for i, part in enumerate(path[:-1]):
        tp = typing.get_type_hints(cls).get(part) if cls is not None else None
        if node.get(part) is None:  # `train:` with every key commented out loads as None: an empty section
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a section")
        if tp is dict or dict in typing.get_args(tp):
            node[".".join(path[i + 1:])] = value
            return
        cls = tp if dataclasses.is_dataclass(tp) else None
    node[path[-1]] = value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load and validate a YAML config (or the defaults when ``path`` is None)."""
    data: dict = {}
    where = "<defaults>"
    if path is not None:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = _yaml(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML (safe subset) at {_yaml_reason(exc)}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
    for ov in overrides or []:
        keys, value = parse_override(ov)
        _apply_override(data, keys, value)
    if overrides:  # a bad value may come from the command line, not the file
        where = f"{where} with --set {' '.join(overrides)}"
    try:
        cfg = _build(Config, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    _check_semantics(cfg, where)
    cfg.source_file = str(path) if path is not None else None
    if path is not None:
        # relative paths in a config are relative to the working directory, like spark-submit;
        # resolve them once so Ray workers and Spark executors agree.
        cfg.storage.root = _absolutize(cfg.storage.root)
        if cfg.data.path and "://" not in cfg.data.path:
            cfg.data.path = str(Path(cfg.data.path).resolve())
    else:
        cfg.storage.root = _absolutize(cfg.storage.root)
    for key in ("checkpoint_dir", "reports_dir"):  # as the root: one place whatever the working directory
        if getattr(cfg.storage, key):
            setattr(cfg.storage, key, _absolutize(getattr(cfg.storage, key)))
    return cfg


def _absolutize(uri: str) -> str:
    if "://" in uri:
        return uri
    return str(Path(uri).resolve())
