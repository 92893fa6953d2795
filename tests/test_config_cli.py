"""Config validation, overrides and the CLI surface."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from causalrec.cli import build_parser, main
from causalrec.config import ConfigError, load_config
from causalrec.stages import PIPELINE

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["local.yaml", "simulated.yaml", "cluster.yaml", "obd.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(REPO / "conf" / name)
    assert cfg.training_set.files_per_split % cfg.train.num_workers == 0


def test_override_parses_yaml_values():
    cfg = load_config(REPO / "conf" / "local.yaml", ["train.epochs=3", "evaluation.k=[1,2]", "ranking.blend_weight=0.25"])
    assert cfg.train.epochs == 3 and cfg.evaluation.k == [1, 2] and cfg.ranking.blend_weight == 0.25


def test_unknown_key_names_key_file_and_allowed(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    msg = str(e.value)
    assert "train.epochz" in msg and str(f) in msg and "epochs" in msg


def test_bad_value_names_allowed_values(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  model: bert\n")
    with pytest.raises(ConfigError, match=r"train.model.*'mf'"):
        load_config(f)
    f.write_text("train:\n  epochs: three\n")
    with pytest.raises(ConfigError, match=r"train.epochs.*expected int"):
        load_config(f)


def test_semantic_check_files_per_split_multiple_of_workers(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  num_workers: 2\ntraining_set:\n  files_per_split: 3\n")
    with pytest.raises(ConfigError, match="multiple of train.num_workers"):
        load_config(f)


@pytest.mark.parametrize("key,value", [("mcar_valid_fraction", 1.0), ("valid_fraction", -0.1)])
def test_split_fractions_must_be_in_unit_interval(tmp_path, key, value):
    f = tmp_path / "c.yaml"
    f.write_text(f"training_set:\n  {key}: {value}\n")
    with pytest.raises(ConfigError, match=rf"training_set.{key}: got {value}, expected a value in \[0, 1\)"):
        load_config(f)


@pytest.mark.parametrize("yaml_text,key", [("choice_eps: 0.7", "propensity.choice_eps"),
                                           ("choice_time_buckets: 0", "propensity.choice_time_buckets"),
                                           ("choice_reg_grid: []", "propensity.choice_reg_grid"),
                                           ("choice_reg_grid: [-1.0]", "propensity.choice_reg_grid")])
def test_choice_model_settings_are_checked(tmp_path, yaml_text, key):
    f = tmp_path / "c.yaml"
    f.write_text(f"propensity:\n  {yaml_text}\n")
    with pytest.raises(ConfigError, match=key):
        load_config(f)


@pytest.mark.parametrize("key, bad, good, expected", [
    *[("attribution_window_s", v, "30", "expected a finite number of seconds > 0") for v in ("0", "-5", ".nan", ".inf")],
    *[("uplift_min_rows", v, "2", "expected an integer >= 2") for v in ("0", "1", "-3")],
])
def test_ope_numbers_out_of_range_are_refused(tmp_path, key, bad, good, expected):
    f = tmp_path / "c.yaml"
    f.write_text(f"ope:\n  {key}: {bad}\n")
    with pytest.raises(ConfigError, match=rf"ope.{key}: got .*, {expected}"):
        load_config(f)
    f.write_text(f"ope:\n  {key}: {good}\n")
    assert getattr(load_config(f).ope, key) == float(good)


def test_attribution_window_defaults_to_none():
    assert load_config(REPO / "conf" / "local.yaml").ope.attribution_window_s is None  # default: no window


@pytest.mark.parametrize("value", ["global", "User", "null", "1"])
def test_attribution_scope_must_be_session_or_user(tmp_path, value):
    import typing

    from causalrec.config import OPEConfig
    from causalrec.decisions import ATTRIBUTION_SCOPES

    f = tmp_path / "c.yaml"
    f.write_text(f"ope:\n  attribution_scope: {value}\n")
    with pytest.raises(ConfigError, match=r"ope.attribution_scope: got .*, expected one of 'session', 'user'"):
        load_config(f)
    f.write_text("ope:\n  attribution_scope: user\n")
    assert load_config(f).ope.attribution_scope == "user"
    assert load_config(REPO / "conf" / "local.yaml").ope.attribution_scope == "session"  # default: today's rule
    assert typing.get_args(typing.get_type_hints(OPEConfig)["attribution_scope"]) == ATTRIBUTION_SCOPES


@pytest.mark.parametrize("share", [0.0, 1.0, 1.5])
def test_abtest_expected_share_must_leave_room_for_both_arms(tmp_path, share):
    f = tmp_path / "c.yaml"
    f.write_text(f"ope:\n  abtest_expected_share: {share}\n")
    with pytest.raises(ConfigError, match=rf"ope.abtest_expected_share: got {share}, expected a value in \(0, 1\)"):
        load_config(f)


def test_override_into_a_section_whose_keys_are_all_commented_out(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  # epochs: 5\n")
    assert load_config(f, ["train.epochs=3"]).train.epochs == 3


def test_bad_override_yaml_names_the_key():
    with pytest.raises(ConfigError, match=r"--set train.objectives: value '\[naive,' is not valid YAML"):
        load_config(None, ["train.objectives=[naive,"])


@pytest.mark.parametrize("yaml_text,match", [
    ('earliest_time: "2030-01-01"\n  latest_time: "2020-01-01"', "data.earliest_time: 2030-01-01 is not before"),
    ("event_types: []", "data.event_types: got \\[\\], expected a non-empty list"),
    ("latest_time: soon", "data.latest_time: got 'soon', expected an ISO date"),
])
def test_ingest_rules_that_reject_every_event_fail_at_load(tmp_path, yaml_text, match):
    f = tmp_path / "c.yaml"
    f.write_text(f"data:\n  {yaml_text}\n")
    with pytest.raises(ConfigError, match=match):
        load_config(f)


def test_unquoted_yaml_date_is_read_as_its_iso_text(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  earliest_time: 2020-01-01\n")
    assert load_config(f).data.earliest_time == "2020-01-01"


@pytest.mark.parametrize("text,overrides,match", [
    # an impossible date fails naming its key and file, not as a bare ValueError from the YAML parser
    ("simulator:\n  start_date: 2024-13-01\n", [], r"c.yaml: simulator.start_date: got '2024-13-01', expected an ISO"),
    ("", ["features.cutoff=2024-02-30"], r"with --set features.cutoff=2024-02-30: features.cutoff: got '2024-02-30'"),
    ("", ["ope.abtest_start=garbage"], r"ope.abtest_start: got 'garbage'"),
    ("features:\n  cutoff: 2024-01-01 25:00:00\n", [], r"features.cutoff: got '2024-01-01 25:00:00'"),
    ("storage:\n  root: ''\n", [], r"c.yaml: storage.root: is empty"),
])
def test_bad_dates_and_an_empty_root_fail_at_load_naming_the_key(tmp_path, text, overrides, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(f, overrides)


def test_yaml_syntax_error_gives_line_and_column_on_its_first_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 3\n  objectives: [naive, ips\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert re.match(r".*c\.yaml: not valid YAML \(safe subset\) at line \d+, column \d+: ", str(err.value).splitlines()[0])


def test_unquoted_timestamps_keep_their_text_and_still_parse(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("features:\n  cutoff: 2024-01-10 12:00:00Z\nsimulator:\n  start_date: 2024-01-01\n")
    cfg = load_config(f)
    assert (cfg.features.cutoff, cfg.simulator.start_date) == ("2024-01-10 12:00:00Z", "2024-01-01")
    from causalrec.features.common import parse_cutoff

    assert parse_cutoff(cfg.features.cutoff).isoformat() == "2024-01-10T12:00:00+00:00"


def test_yaml_cannot_execute_code(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("project: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for stage in PIPELINE:
        assert stage.name in out
    assert "run" in out and "simulate" in out


def test_cli_failure_is_one_line_and_nonzero(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochz: 3\n")
    assert main(["ingest", str(f)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'train.epochz'" in err[0]


def test_cli_failure_keeps_the_last_line_of_a_wrapped_traceback(monkeypatch, tmp_path, capsys):
    """A Python worker's error arrives wrapped, its cause on the last line: the one-line reason keeps it."""
    import causalrec.cli as cli

    def fail(ctx, name):
        raise RuntimeError("Failed to initialize Python data source writer: Traceback (most recent call last):\n"
                           "  File \"x.py\", line 1, in <module>\nModuleNotFoundError: No module named 'causalrec'\n")
    monkeypatch.setattr(cli, "run_stage", fail)
    f = tmp_path / "c.yaml"
    f.write_text(f"storage:\n  root: {tmp_path}\n")
    assert main(["features", str(f)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("... ModuleNotFoundError: No module named 'causalrec' (-v for the whole "
                                             "message)"), err


def test_console_script_and_job_entry_point():
    exe = Path(sys.executable).parent / "causalrec"
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "ingest" in res.stdout
    res = subprocess.run([sys.executable, str(REPO / "jobs" / "ingest.py"), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and "--config" in res.stdout


def test_spark_submit_master_and_conf_win_over_config(tmp_path):
    """jobs/*.py under spark-submit keep the submitter's master and confs (config says local[*], 8).

    The config's spark.conf holds conf/cluster.yaml's Delta keys, static configs the submitter did not
    pass: the job warns with the --conf flags to pass instead of failing on the running session."""
    spark_submit = Path(sys.executable).parent / "spark-submit"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"storage:\n  root: {tmp_path / 'tables'}\nspark:\n  shuffle_partitions: 8\n  driver_memory: 6g\n"
                   "  app_name: from_config\n  conf:\n"
                   "    spark.sql.extensions: io.delta.sql.DeltaSparkSessionExtension\n"
                   "    spark.sql.catalog.spark_catalog: org.apache.spark.sql.delta.catalog.DeltaCatalog\n")
    res = subprocess.run(
        [str(spark_submit), "--master", "local[1]", "--name", "airflow_task", "--conf", "spark.sql.shuffle.partitions=3",
         "--conf", "spark.ui.enabled=false", str(REPO / "jobs" / "doctor.py"), "--config", str(cfg)],
        capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    info = json.loads(res.stdout[res.stdout.index("{"):])
    assert info["spark_master"] == "local[1]" and info["spark_app_name"] == "airflow_task"
    assert info["spark_shuffle_partitions"] == "3"
    assert info["launched_by_spark_submit"] is True
    assert info["delta_backend"] == "delta-rs"
    # spark-submit merges the Python driver's stderr (the log) into stdout
    assert "--conf spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension" in res.stdout
    assert "through delta-rs" in res.stdout
    assert "spark.driver_memory 6g is not applied" in res.stdout and "pass --driver-memory 6g" in res.stdout


def test_conf_gaps_a_running_session_cannot_take_are_reported_not_set(spark, caplog):
    """fill_conf_gaps (get_spark under spark-submit) sets the unset keys it can; a static key is reported,
    and Delta's catalog is not swapped in without Delta's extension (without Delta's classes on the
    classpath every query would fail: 'Cannot find catalog plugin class')."""
    from causalrec.config import Config
    from causalrec.sessions import fill_conf_gaps

    ext, cat, shuffle = "spark.sql.extensions", "spark.sql.catalog.spark_catalog", "spark.sql.shuffle.partitions"
    cfg = Config()
    cfg.spark.conf = {ext: "io.delta.sql.DeltaSparkSessionExtension",
                      cat: "org.apache.spark.sql.delta.catalog.DeltaCatalog", "spark.causalrec.test.gap": "filled"}
    cfg.spark.shuffle_partitions = 7
    assert spark.conf.get(ext, None) is None and spark.conf.get(cat, None) is None
    before = spark.conf.get(shuffle)
    try:
        assert fill_conf_gaps(spark, cfg) == [ext, cat] and spark.conf.get(shuffle) == before  # the session's wins
        # as spark-submit leaves them without --conf: spark.shuffle_partitions and the local SQL settings fill them
        for key in (shuffle, "spark.sql.ansi.enabled", "spark.sql.session.timeZone"):
            spark.conf.unset(key)
        with caplog.at_level("WARNING", logger="causalrec.sessions"):
            assert fill_conf_gaps(spark, cfg) == [ext, cat]
        assert spark.conf.get(shuffle) == "7"
        assert (spark.conf.get("spark.sql.ansi.enabled"), spark.conf.get("spark.sql.session.timeZone")) == ("false", "UTC")
        assert spark.conf.get("spark.causalrec.test.gap") == "filled"
        assert spark.conf.get(cat, None) is None
        assert spark.range(3).count() == 3
        assert ("--conf spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension --conf "
                "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog") in caplog.text
        assert "delta-spark is not on Spark's classpath, so causalrec reads and writes the Delta tables through " \
               "delta-rs" in caplog.text
    finally:
        spark.conf.set(shuffle, before)
        spark.conf.set("spark.sql.ansi.enabled", "false")
        spark.conf.set("spark.sql.session.timeZone", "UTC")
        for key in ("spark.causalrec.test.gap", cat):
            if spark.conf.get(key, None) is not None:
                spark.conf.unset(key)


def test_spark_submit_opts_alone_is_not_a_spark_submit_launch(monkeypatch):
    """A user's exported SPARK_SUBMIT_OPTS made a plain local run drop its whole local session setup."""
    from causalrec.sessions import _launched_by_spark_submit

    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    monkeypatch.setenv("SPARK_SUBMIT_OPTS", "-Dfoo=bar")
    assert not _launched_by_spark_submit()
    monkeypatch.setenv("PYSPARK_GATEWAY_PORT", "40123")
    assert _launched_by_spark_submit()


def test_a_local_session_takes_small_tungsten_pages(spark):
    """get_spark's local session sets spark.buffer.pageSize to LOCAL_PAGE_SIZE: with Spark's 64 MB pages,
    training_set's chained sorts and aggregates ran a 4 GB driver's execution memory dry on the suite's
    few-hundred-row impression logs (UNABLE_TO_ACQUIRE_MEMORY, seen on CI)."""
    from causalrec.sessions import LOCAL_PAGE_SIZE

    assert LOCAL_PAGE_SIZE == "4m"
    assert spark.sparkContext._jvm.org.apache.spark.SparkEnv.get().memoryManager().pageSizeBytes() == 4 * 1024 * 1024


@pytest.mark.parametrize("overrides,match", [
    (["training_set.split=time", "training_set.valid_fraction=0.6", "training_set.test_fraction=0.6"],
     r"training_set.test_fraction: valid_fraction \+ test_fraction = 1.2, expected < 1 with split='time'"),
    (["propensity.choice_reg_grid=[abc]"], r"propensity.choice_reg_grid\[0\]: got 'abc' \(str\), expected float"),
    (["evaluation.k=[0, 5]"], r"evaluation.k: got \[0, 5\], expected a non-empty list of cut-offs >= 1"),
    (["evaluation.k=[a]"], r"evaluation.k\[0\]: got 'a' \(str\), expected int"),
    (["train.epochs=0"], r"train.epochs: got 0, expected an integer >= 1"),
    (["scoring.batch_size=0"], r"scoring.batch_size: got 0, expected an integer >= 1"),
    (["ope.baseline=popularity"], r"ope.baseline: got 'popularity', expected one of ope.strategies"),
])
def test_values_that_failed_later_without_naming_the_key_fail_at_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_list_elements_take_their_type(tmp_path):
    """YAML 1.1 reads 2e-1 as a string: popularity_groups [2e-1, 0.5] reached the features stage as
    ['2e-1', 0.5] and failed there on '<' between str and float."""
    f = tmp_path / "c.yaml"
    f.write_text("features:\n  popularity_groups: [2e-1, 0.5]\nope:\n  switch_dr_lambdas: [1, 1e3, .inf]\n")
    cfg = load_config(f)
    assert cfg.features.popularity_groups == [0.2, 0.5]
    assert cfg.ope.switch_dr_lambdas == [1.0, 1000.0, float("inf")]


@pytest.mark.parametrize("override,match", [
    ("propensity.compare_methods=[popularty]",
     r"propensity.compare_methods: 'popularty' is not one of \['popularity', 'naive_bayes', 'logistic'\]"),
    ("propensity.adjustment_set=[user_feature]",
     r"propensity.adjustment_set: 'user_feature' is not one of \['user_features', 'item_features'\]"),
    ("propensity.holdout_fraction=1.0", r"propensity.holdout_fraction: got 1.0, expected a value in \[0, 1\)"),
    ("propensity.holdout_fraction=-0.1", r"propensity.holdout_fraction: got -0.1, expected a value in \[0, 1\)"),
])
def test_propensity_typos_fail_at_load_naming_key_and_allowed_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize("override", ["ranking.blend_weight=1.5", "ranking.blend_weight=-0.5"])
def test_a_blend_weight_outside_0_1_fails_at_load(override):
    """Above 1 the blend's relevance weight 1 - w turns negative and ranks the least relevant first."""
    with pytest.raises(ConfigError, match=r"ranking.blend_weight: got -?[0-9.]+, expected a value in \[0, 1\]"):
        load_config(None, [override])
    assert load_config(None, ["ranking.blend_weight=1.0"]).ranking.blend_weight == 1.0


@pytest.mark.parametrize("override,match", [
    ("ope.alpha=1.5", r"ope.alpha: got 1.5, expected the miss rate in \(0, 1\)"),
    ("ope.alpha=0", r"ope.alpha: got 0(\.0)?, expected the miss rate in \(0, 1\)"),
    ("ope.bootstrap_buckets=1", r"ope.bootstrap_buckets: got 1, expected 0 \(a Poisson weight per row\) or at least 100"),
    ("ope.bootstrap_buckets=2", r"ope.bootstrap_buckets: got 2, expected 0"),
])
def test_ope_interval_settings_that_make_no_interval_fail_at_load(override, match):
    """alpha 1.5 gave ci_low > ci_high and one bootstrap bucket a zero-width interval, both written
    to ope_results as if real."""
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_ope_alpha_above_one_half_loads_with_a_warning(caplog):
    """0.95 is a legal miss rate but almost always meant as the confidence level: say so."""
    with caplog.at_level("WARNING", logger="causalrec.config"):
        assert load_config(None, ["ope.alpha=0.95"]).ope.alpha == 0.95
    assert "ope.alpha is 0.95: intervals at 5% confidence" in caplog.text
    assert load_config(None, ["ope.bootstrap_buckets=100"]).ope.bootstrap_buckets == 100


def test_config_propensity_choices_match_the_registries():
    """The config names the allowed exposure methods and feature groups without importing Spark code;
    they must be the registries' keys."""
    import typing

    from causalrec.config import ADJUSTMENT_GROUPS, PropensityConfig
    from causalrec.propensity.exposure import ESTIMATORS
    from causalrec.propensity.job import GROUP_COLUMNS

    assert set(typing.get_args(typing.get_type_hints(PropensityConfig)["exposure_method"])) == set(ESTIMATORS)
    assert set(ADJUSTMENT_GROUPS) == set(GROUP_COLUMNS)


def test_set_into_a_dict_field_keeps_the_dotted_rest_as_one_key():
    """``spark.conf`` is a mapping of Spark keys that themselves contain dots: the rest of the path is one key,
    not nested sections (which Spark would get as a key 'spark' with a dict's text)."""
    cfg = load_config(REPO / "conf" / "cluster.yaml", ["spark.conf.spark.sql.adaptive.enabled=false",
                                                       "spark.conf.spark.executor.memory=8g"])
    assert cfg.spark.conf["spark.sql.adaptive.enabled"] is False
    assert cfg.spark.conf["spark.executor.memory"] == "8g"
    assert "spark" not in cfg.spark.conf
    assert cfg.spark.conf["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"  # the file's keys stay
    assert load_config(None, ["spark.conf.spark.ui.port=4050"]).spark.conf == {"spark.ui.port": 4050}


@pytest.mark.parametrize("override,key,want", [
    ("train.learning_rate=1e-3", "learning_rate", 1e-3),
    ("train.encoder_lr=2e-5", "encoder_lr", 2e-5),
    ("train.text_match_init=-1.5E+2", "text_match_init", -150.0),
])
def test_exponent_floats_are_accepted_from_set_and_yaml(tmp_path, override, key, want):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; a float field takes it as the number it spells."""
    assert getattr(load_config(None, [override]).train, key) == pytest.approx(want)
    f = tmp_path / "c.yaml"
    f.write_text(f"train:\n  {key}: {override.split('=', 1)[1]}\n")
    got = getattr(load_config(f).train, key)
    assert isinstance(got, float) and got == pytest.approx(want)


@pytest.mark.parametrize("override", ["train.learning_rate=fast", "train.learning_rate=nan", "train.learning_rate=true",
                                      "train.encoder_lr=1e-3x"])
def test_float_fields_still_refuse_non_numbers(override):
    with pytest.raises(ConfigError, match=r"train\.(learning_rate|encoder_lr): got .*expected float"):
        load_config(None, [override])


def test_readme_ray_job_runtime_env_installs_the_pinned_requirements(monkeypatch):
    """The documented `ray job submit --runtime-env-json`: a nested `-r requirements.txt` in its pip list
    was resolved against Ray's own requirements file and failed; a path is read on the submitting side."""
    import json
    import re

    from ray.runtime_env import RuntimeEnv

    text = (REPO / "README.md").read_text()
    env_json = re.search(r"--runtime-env-json '([^']+)'", text).group(1)
    monkeypatch.chdir(REPO)  # ray job submit runs from the repository root, as the README's command does
    packages = RuntimeEnv(**json.loads(env_json))["pip"]["packages"]
    pins = [ln.strip() for ln in (REPO / "requirements.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    assert set(pins) <= set(packages) and not any(p.startswith("-r") for p in packages)


def _just_outside_and_inside(spec: str):
    """A value just outside ``spec`` (causalrec.config.NUMBER_RANGES' form) and one on its closed edge
    or, for an open interval, in its middle."""
    from causalrec.config import _BOUND, _INTERVAL

    bound = _BOUND.match(spec)
    if bound:
        low = float(bound.group(3))
        step = 1 if bound.group(1) else 0.5
        outside = low - step if bound.group(2) == ">=" else low
        inside = low if bound.group(2) == ">=" else low + step
        return (int(outside), int(inside)) if bound.group(1) else (outside, inside)
    opening, low, high, closing = _INTERVAL.match(spec).groups()
    low, high = float(low), float(high)
    outside = high if closing == ")" else low if opening == "(" else high + 0.5
    inside = low if opening == "[" else high if closing == "]" else (low + high) / 2
    return outside, inside


def _range_cases():
    from causalrec.config import NUMBER_RANGES

    return sorted(NUMBER_RANGES.items())


@pytest.mark.parametrize("key,spec", _range_cases())
def test_every_checked_number_refuses_a_value_just_outside_its_range(key, spec):
    """A value just outside fails at load naming the key, the value and the range; one on the edge loads."""
    outside, inside = _just_outside_and_inside(spec)
    name = key.rstrip("[]")
    shown = f"{name}\\[0\\]" if key.endswith("[]") else name
    with pytest.raises(ConfigError, match=rf"{shown}: got {outside}, expected "):
        load_config(None, [f"{name}={[outside] if key.endswith('[]') else outside}"])
    if not key.endswith("[]"):
        section, field = name.split(".")
        # one file per split is a multiple of one worker, not of the default two
        also = ["train.num_workers=1"] if key == "training_set.files_per_split" else []
        assert getattr(getattr(load_config(None, [f"{name}={inside}", *also]), section), field) == inside


@pytest.mark.parametrize("override,match", [
    ("train.learning_rate=-0.01", r"train.learning_rate: got -0.01, expected a number > 0"),
    ("features.smoothing_prior_strength=-1", r"features.smoothing_prior_strength: got -1.0, expected a number >= 0"),
    ("features.popularity_groups=[0.5, 0.2]", r"features.popularity_groups: got \[0.5, 0.2\], expected two cumulative"),
    ("features.popularity_groups=[0.2]", r"features.popularity_groups: got \[0.2\], expected two cumulative"),
    ("features.windows_days=[]", r"features.windows_days: got \[\], expected a non-empty list, each element an integer >= 1"),
    ("candidates.max_candidates=0", r"candidates.max_candidates: got 0, expected an integer >= 1"),
    ("train.ips_clip=0.6", r"train.ips_clip: got 0.6, expected a value in \(0, 0.5\)"),
    ("training_set.files_per_split=0", r"training_set.files_per_split: got 0, expected an integer >= 1"),
])
def test_numbers_that_ran_silently_wrong_or_failed_late_fail_at_load(override, match):
    """Before: a negative learning rate trained uphill, popularity groups out of order or a negative
    smoothing strength reached the features stage, and files_per_split 0 passed as a multiple of
    num_workers."""
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_a_bad_set_value_is_reported_with_the_override_not_only_the_file(tmp_path):
    """--set ranking.k=x was reported as "c.yaml: ranking.k: ...", while c.yaml says k: 5."""
    f = tmp_path / "c.yaml"
    f.write_text("ranking:\n  k: 5\n")
    with pytest.raises(ConfigError, match=r"c.yaml with --set ranking.k=x: ranking.k: got 'x' \(str\), expected int"):
        load_config(f, ["ranking.k=x"])


def test_relative_report_and_checkpoint_folders_resolve_once(tmp_path, monkeypatch):
    """A relative storage.reports_dir was left relative: a run from another directory wrote the report
    elsewhere while evaluate's JSON stayed where the first run put it."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["storage.reports_dir=rel_reports", "storage.checkpoint_dir=ckpt"])
    assert (cfg.storage.reports_dir, cfg.storage.checkpoint_dir) == (str(tmp_path / "rel_reports"), str(tmp_path / "ckpt"))
