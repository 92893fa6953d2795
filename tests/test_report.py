"""The HTML report: rendered from a realistic data dict and from tables, and opened in headless Chromium.

The browser check talks to Chromium over the DevTools protocol with a ~60-line
stdlib WebSocket client (no websocket package is installed): one browser
process gives console errors, failed loads, network requests, element checks
and a screenshot. Without a ``chromium`` binary that test is skipped with the
install command.
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from causalrec import report as R

# --------------------------------------------------------------------------- a realistic data dict


def _metric(metric, model, slice_, value, k=None, lo=None, hi=None, n=100, **details):
    return {"metric": metric, "k": k, "slice": slice_, "model": model, "value": value, "ci_low": lo, "ci_high": hi,
            "n": n, "details_json": json.dumps(details)}


def realistic_data() -> dict:
    rng = np.random.default_rng(0)
    metrics = []
    for model, fam, mse, ndcg in (("mf:naive", "naive", 1.21, 0.61), ("mf:ips", "debiased", 1.09, 0.64),
                                  ("mf:uplift", "causal", 1.15, 0.62)):
        metrics.append(_metric("mse", model, "mcar_test", mse, lo=mse - 0.05, hi=mse + 0.05, n=4640, family=fam))
        metrics.append(_metric("mae", model, "mcar_test", mse * 0.77, n=4640, family=fam))
        metrics.append(_metric("auc", model, "mcar_test", 0.7 + ndcg / 10, n=4640, family=fam))
        for k in (5, 10):
            v = ndcg + k / 100
            metrics.append(_metric("ndcg", model, "mcar_test", v, k=k, lo=v - 0.03, hi=v + 0.03, n=290, family=fam))
            metrics.append(_metric("recall", model, "mcar_test", ndcg - 0.1, k=k, n=290, family=fam))
    metrics.append(_metric("weight_ess", "exposure_propensity", "observed", 2100.0, n=None, ess_ratio=0.30))
    for policy, g in (("relevance", 0.71), ("fair", 0.48)):
        metrics.append(_metric("exposure_gini", f"policy:{policy}", "recommendations", g, k=10))
        metrics.append(_metric("catalog_coverage", f"policy:{policy}", "recommendations", 1 - g / 2, k=10))
    edges = list(np.linspace(0, 1, 31))
    p = np.clip(rng.beta(1.2, 8, 5000), 0.01, 1)
    w = np.log10(1 / p)
    wedges = list(np.linspace(w.min(), w.max(), 31))

    def lorenz(power):
        x = np.linspace(0, 1, 101)
        return {"x": list(x), "y": list(x ** power)}

    qx = list(np.linspace(0, 1, 21))
    curves = {
        "propensity_hist": {"edges": edges, "counts": list(np.histogram(p, edges)[0].astype(int).tolist()),
                            "n": 5000, "log10": False},
        "weight_hist": {"edges": wedges, "counts": np.histogram(w, wedges)[0].astype(int).tolist(), "n": 5000,
                        "log10": True},
        # evaluate marks the list the fair re-ranker started from (here ranking.fair_base_policy = relevance)
        "lorenz": {"relevance": dict(lorenz(3.5), gini=0.71, before_fair_reranking=True),
                   "fair": dict(lorenz(1.8), gini=0.48)},
        "qini": {"mf:uplift": {"x": qx, "y": [40 * math.sqrt(x) for x in qx], "random": [40 * x for x in qx],
                               "qini_coefficient": 0.012, "n": 2000}},
        "calibration": {"mf:naive (mnar_test)": {"bins": [{"mean_predicted": b / 10 + 0.05,
                                                           "observed_rate": min(1, b / 10 + 0.02)} for b in range(10)],
                                                 "ece": 0.03}},
    }
    diag = [{"run_id": "p1", "propensity": "exposure", "method": "logistic", "metric": "reliability", "bin": b,
             "value": None, "pred_mean": b / 10 + 0.05, "obs_rate": b / 10 + 0.03, "n": 500.0} for b in range(10)]
    diag += [{"run_id": "p1", "propensity": "exposure", "method": "logistic", "metric": "ece", "bin": None,
              "value": 0.021, "pred_mean": None, "obs_rate": None, "n": 5000.0}]
    ope = []
    for policy, base in (("random", 0.004), ("popular", 0.0052), ("recommendations", 0.0061)):
        for est, jitter in (("ips", 0.0004), ("snips", 0.0001), ("dm", -0.0003), ("dr", 0.0)):
            v = base + jitter
            ope.append({"run_id": "ope1", "policy": policy, "estimator": est, "estimate": v, "std_err": 0.0004,
                        "ci_low": v - 0.0008, "ci_high": v + 0.0008, "interval_method": "bootstrap", "ess": 3000.0,
                        "max_weight": 12.0, "n": 10000, "diff_to_baseline": v - 0.004, "logged_policy": "exposure"})
    runs = []
    for obj in ("naive", "ips", "uplift"):
        epochs = [{"epoch": e, "train_loss": 1.5 / (e + 1) + 0.8, "valid_metric": 1.3 / (e + 1) + 1.0}
                  for e in range(6)]
        runs.append({"run_id": f"mf-{obj}-1", "model": "mf", "objective": obj, "model_version": f"mf-{obj}-1",
                     "checkpoint_path": "/tmp/ckpt", "metrics_json": json.dumps({"epochs": epochs, "valid_mode": "mcar"}),
                     "best_epoch": 5, "created_at": "2026-01-01T00:00:00"})
    uplift = uplift_effects(rng.normal(0.02, 0.03, 40))
    summary = [{"policy": "fair", "k": 10, "fairness_attribute": "popularity_group", "fairness_strength": 0.5,
                "n_users": 290, "relevance_unconstrained": 100.0, "relevance_policy": 96.0, "relevance_cost": 0.04,
                "gini_before": 0.71, "gini_after": 0.48, "n_boosted": 310}]
    return {
        "title": "causalrec report - Coat", "dataset": "coat", "generated_at": "2026-01-01 00:00 UTC",
        "tables": {"metrics": metrics, "propensity_diagnostics": diag, "ope_results": ope, "train_runs": runs,
                   "uplift_effects": uplift, "ranking_summary": summary},
        "evaluation": {"models": [{"model": "mf:naive", "family": "naive"}, {"model": "mf:ips", "family": "debiased"},
                                  {"model": "mf:uplift", "family": "causal"}],
                       "curves": curves, "missing": {"ground_truth": "not found"}, "k": [5, 10]},
    }


def uplift_effects(effects) -> list[dict]:
    """uplift_effects as uplift.run writes it: overall, item and segment rows, once per method;
    IPS item effects sit 0.05 above DR's so mixing the methods shows in the counts."""
    rows = []
    for method, shift in (("ips", 0.05), ("dr", 0.0)):
        base = {"run_id": "u1", "method": method, "se": 0.01, "n": 100, "item_id": None, "segment": None}
        rows.append(dict(base, level="overall", effect=0.02 + shift, ci_low=0.01 + shift, ci_high=0.03 + shift,
                         n=10000))
        for seg in ("a", "b"):
            rows.append(dict(base, level="segment", segment=seg, effect=0.03 + shift, ci_low=0.02 + shift,
                             ci_high=0.04 + shift, n=5000))
        for i, e in enumerate(effects):
            e = float(e) + shift
            rows.append(dict(base, level="item", item_id=f"i{i}", effect=e, ci_low=e - 0.02, ci_high=e + 0.02))
    return rows


# one figure each: models, propensity hist, calibration, weights, OPE, Qini, per-item uplift, Lorenz, training
EXPECTED_PLOTS = 9


def test_render_report_has_every_plot_and_a_summary_from_the_numbers():
    page = R.render_report(realistic_data())
    assert page.count('<img class="plot"') == EXPECTED_PLOTS
    assert 'class="missing"' not in page
    # self-contained: no scripts, no external resources
    assert "<script" not in page and "<link" not in page and 'src="http' not in page
    summary = R.summary_sentences(realistic_data())
    assert any("MSE 1.090 versus 1.210" in s and "lower, i.e. better" in s for s in summary), summary
    assert any("Gini of recommendation counts across items from 0.710 to 0.480" in s and "4.0%" in s
               for s in summary), summary
    assert any("'recommendations' highest" in s for s in summary), summary
    for s in summary:
        assert s in page.replace("&#x27;", "'")
    # the summary comes first, before any section
    assert page.index('class="summary"') < page.index("<section>")
    assert "naive vs debiased vs causal" in page and "Qini" in page
    # the model table shows intervals
    assert "1.0900 [1.0400, 1.1400]" in page


def test_uplift_summary_counts_items_of_one_method():
    """Overall and segment rows are not items, and each item is counted once (DR, not DR + IPS)."""
    data = realistic_data()
    dr = [r for r in data["tables"]["uplift_effects"] if r["level"] == "item" and r["method"] == "dr"]
    n_sig = sum(r["ci_low"] > 0 for r in dr)
    assert 0 < n_sig < 40
    assert f"{n_sig} of 40 items have a recommendation effect whose 95% interval lies above zero (DR estimates)." \
        in R.summary_sentences(data)
    items = R._item_summary(data)  # what the per-item plot draws
    assert items["method"] == "dr" and items["n_items"] == len(dr) and len(items["top"]) == R.ITEM_TOP
    best = sorted(dr, key=lambda r: -r["effect"])[:R.ITEM_TOP]
    assert [r["item_id"] for r in items["top"]] == [r["item_id"] for r in best]
    assert items["curve"]["cum"][-1] == pytest.approx(sum(r["effect"] * r["n"] for r in dr))
    ips_only = {"tables": {"uplift_effects": [r for r in data["tables"]["uplift_effects"] if r["method"] == "ips"]}}
    n_ips = sum(r["ci_low"] > 0 for r in ips_only["tables"]["uplift_effects"] if r["level"] == "item")
    assert f"{n_ips} of 40 items" in " ".join(R.summary_sentences(ips_only))


def test_the_two_ginis_have_distinct_names():
    """ranking_summary's Gini is of plain recommendation counts; the Lorenz curve's is position-discounted."""
    data = realistic_data()
    page = R.render_report(data)
    assert "Gini of recommendation counts before" in page and "Gini of position-discounted exposure" in page
    del data["tables"]["ranking_summary"]
    assert any("Gini of position-discounted exposure across items from 0.710 to 0.480" in s
               for s in R.summary_sentences(data))


def test_appended_tables_show_each_key_s_latest_run_only(monkeypatch):
    """ranking_summary and train_runs gain rows with every run. The summary quoted fair[-1], which in
    delta-rs' newest-file-first order is the oldest fair run, and the tables and training curves
    showed every past run as if current."""
    data = realistic_data()
    fair = data["tables"]["ranking_summary"][0]
    data["tables"]["ranking_summary"] = [  # newest first, as delta-rs reads an appended table
        dict(fair, gini_after=0.30, relevance_cost=0.12, created_at="2026-01-03T00:00:00", model_version="v3"),
        dict(fair, gini_after=0.48, relevance_cost=0.04, created_at="2026-01-02T00:00:00", model_version="v2"),
        dict(fair, gini_after=0.60, relevance_cost=0.01, created_at="2026-01-01T00:00:00", model_version="v1")]
    summary = " ".join(R.summary_sentences(data))
    assert "from 0.710 to 0.300 at a relevance cost of 12.0%" in summary, summary
    exposure = R.section_exposure(data)
    assert "<td>v3</td>" in exposure and "<td>v2</td>" not in exposure and "<td>v1</td>" not in exposure
    old = dict(data["tables"]["train_runs"][1], run_id="mf-ips-old", created_at="2025-12-01T00:00:00")
    data["tables"]["train_runs"].append(old)
    figs = _capture_figures(monkeypatch)
    training = R.section_training(data)
    assert "mf-ips-1" in training and "mf-ips-old" not in training
    assert figs["training curves"][1].count("mf:ips") == 2  # one curve in each panel, not one per run


def test_uplift_intervals_carry_the_level_they_were_computed_at():
    """uplift is a side stage: its rows keep the alpha of their run, which can differ from this report's
    ope.alpha; the label follows the rows (95% intervals were printed as 90%)."""
    data = dict(realistic_data(), alpha=0.10)
    data["tables"]["uplift_effects"] = [dict(r, alpha=0.05) for r in data["tables"]["uplift_effects"]]
    summary = R.summary_sentences(data)
    assert any("whose 95% interval lies above zero" in s for s in summary), summary
    assert any("(90% CI " in s for s in summary)  # ope_results without a recorded alpha: this run's ope.alpha
    # ope_results rows record their run's alpha too: it wins over this report's (a standalone report run
    # under another ope.alpha printed the OPE intervals at its own level)
    data["tables"]["ope_results"] = [dict(r, alpha=0.05) for r in data["tables"]["ope_results"]]
    summary = R.summary_sentences(data)
    assert any("(95% CI " in s for s in summary) and not any("(90% CI " in s for s in summary), summary


def test_missing_numbers_are_not_drawn_as_zero_and_do_not_blank_a_section(monkeypatch):
    """A NaN MSE was a bar of height 0 (a perfect model to the eye); an ESS read back as None raised in
    its caption and blanked the whole propensity section."""
    drawn = {}

    def fig_html(fig, alt, caption):
        ax = fig.axes[0]
        drawn[alt] = ([p.get_height() for p in ax.patches], [t.get_text() for t in ax.get_xticklabels()], caption)
        R._plt().close(fig)
        return "<figure></figure>"

    monkeypatch.setattr(R, "_fig_html", fig_html)
    rows = [dict(model="mf:naive", metric="mse", k=None, slice="mcar_test", value=1.20, ci_low=1.1, ci_high=1.3,
                 details_json='{"family": "naive"}'),
            dict(model="mf:ips", metric="mse", k=None, slice="mcar_test", value=None, ci_low=None, ci_high=None,
                 details_json='{"family": "debiased"}')]
    R.section_models({"tables": {"metrics": rows}})
    heights, labels, _ = drawn["model comparison bar chart"]
    assert heights[0] == pytest.approx(1.2) and math.isnan(heights[1])
    assert labels[1] == "mf:ips\n(no value)"
    data = realistic_data()
    for r in data["tables"]["metrics"]:
        if r["metric"] == "weight_ess":
            r["value"] = None
    section = R.section_propensity(data)
    assert "could not be drawn" not in section and "Effective sample size" not in drawn["inverse weight distribution"][2]


def _capture_figures(monkeypatch) -> dict:
    """alt text -> (axes titles, legend labels, caption) of every figure the report draws."""
    figs = {}

    def fig_html(fig, alt, caption):
        figs[alt] = ([ax.get_title() for ax in fig.axes], [lab for ax in fig.axes
                                                           for lab in ax.get_legend_handles_labels()[1]], caption)
        R._plt().close(fig)
        return f"<figure><figcaption>{caption}</figcaption></figure>"

    monkeypatch.setattr(R, "_fig_html", fig_html)
    return figs


def test_interval_labels_follow_the_configured_alpha(monkeypatch, cfg):
    """ope_results and uplift_effects intervals are computed at ope.alpha: with 0.10 they are 90% intervals
    and every label says so (it said 95%). The evaluation metrics' intervals are 95% whatever ope.alpha is."""
    from causalrec.explain import explain, lift_interval

    figs = _capture_figures(monkeypatch)
    data = dict(realistic_data(), alpha=0.10)
    summary = R.summary_sentences(data)
    assert any("'recommendations' highest" in s and "(90% CI " in s for s in summary), summary
    assert any("items have a recommendation effect whose 90% interval lies above zero" in s for s in summary)
    assert not any("95%" in s for s in summary), summary
    page = R.render_report(data)
    assert figs["off-policy estimates"][0] == ["Off-policy estimates with 90% intervals"]
    assert "bars are 90% intervals" in figs["off-policy estimates"][2] and "bars are 90% intervals" in page
    assert "probabilities (pi_b) came from: exposure." in figs["off-policy estimates"][2]
    assert "Per-item effects with 90% intervals" in figs["uplift per item"][0]
    assert all("(95% CI)" in t for t in figs["model comparison bar chart"][0])  # metrics: Z95
    assert "95%" not in " ".join(R.summary_sentences(dict(realistic_data(), alpha=0.10)))
    assert "(95% CI " in " ".join(R.summary_sentences(realistic_data()))  # no alpha recorded: 0.05
    # collect_report_data records the level the report labels with
    cfg.ope.alpha = 0.10
    assert R.collect_report_data(cfg)["alpha"] == 0.10
    # explanations: the item effect's interval comes from uplift_effects at ope.alpha, the lift's own at alpha
    text = explain(policy="uplift", rank=1, relevance=0.3, uplift=None, interval=None, similar=[], boosted=False,
                   item_effect=(0.03, 0.01, 0.05), alpha=0.10)
    assert "(90% interval +1.0 to +5.0)" in text and "95%" not in text
    lo, hi = lift_interval(0.03, 0.01, alpha=0.10)
    assert (hi - lo) / 2 == pytest.approx(1.6448536 * 0.01)
    text = explain(policy="uplift", rank=1, relevance=0.3, uplift=0.03, interval=(lo, hi), similar=[], boosted=False,
                   alpha=0.10)
    assert "(90% interval +1.4 to +4.6)" in text


def test_mse_axis_names_the_unit_of_the_models_target():
    """A click model's MSE (0/1 outcome against a probability) was labelled 'rating points squared'."""
    from causalrec.report import _mse_unit

    click, rating = {"details_json": '{"target": "outcome"}'}, {"details_json": '{"target": "label"}'}
    assert _mse_unit([click, click]) == " (squared error on the probability scale)"
    assert _mse_unit([rating, None]) == " (squared error in each model's unit)"
    assert _mse_unit([rating]) == " (rating points squared)"
    assert "each model" in _mse_unit([click, rating])


def test_a_nan_metric_is_a_dash_and_the_model_table_still_renders():
    """A NaN metric reaches the report as None (_plain); its cell shows a dash instead of blanking the section."""
    rows = [dict(model="mf:naive", metric="mse", k=None, slice="mcar_test", value=1.20, ci_low=1.1, ci_high=1.3,
                 details_json='{"family": "naive"}'),
            dict(model="mf:ips", metric="mse", k=None, slice="mcar_test", value=float("nan"), ci_low=float("nan"),
                 ci_high=float("nan"), details_json='{"family": "debiased"}'),
            dict(model="mf:ips", metric="mae", k=None, slice="mcar_test", value=float("nan"), ci_low=0.1, ci_high=0.2,
                 details_json='{"family": "debiased"}')]
    for plain in (True, False):  # as read back from Delta (None) and as a float NaN
        data = {"tables": {"metrics": [{k: R._plain(v) if plain else v for k, v in r.items()} for r in rows]}}
        html_text = R.section_models(data)
        assert "1.2000 [1.1000, 1.3000]" in html_text
        assert "<td>mf:ips</td><td>debiased</td><td>–</td><td>–</td>" in html_text
        page = R.render_report(data)
        assert "could not be drawn" not in page and "1.2000 [1.1000, 1.3000]" in page
        assert not any("mf:ips" in s for s in R.summary_sentences(data))  # no comparison from a missing value


def test_lorenz_before_label_names_the_list_the_fair_reranker_started_from(monkeypatch):
    """The "before fair re-ranking" curve is the one evaluate marks (ranking.fair_base_policy's top-K, e.g.
    blend), not whichever list is called relevance; the summary's fallback Gini uses the same curve."""
    figs = _capture_figures(monkeypatch)
    curve = {"x": [0, .5, 1], "y": [0, .2, 1]}
    lor = {"relevance": dict(curve, gini=0.80), "blend": dict(curve, gini=0.62, before_fair_reranking=True),
           "fair": dict(curve, gini=0.45)}
    data = {"tables": {}, "evaluation": {"curves": {"lorenz": lor}}}
    R.section_exposure(data)
    assert figs["exposure lorenz curve"][1] == ["equal exposure", "blend (before fair re-ranking), Gini 0.620",
                                                "fair (after fair re-ranking), Gini 0.450", "relevance, Gini 0.800"]
    assert any("across items from 0.620 to 0.450" in s for s in R.summary_sentences(data))
    del lor["blend"]  # a list not marked as the base is never called "before"
    R.section_exposure(data)
    assert not any("before" in s for s in figs["exposure lorenz curve"][1])
    assert not any("Fair re-ranking moves" in s for s in R.summary_sentences(data))


def test_render_report_names_the_stage_for_missing_inputs():
    page = R.render_report({"title": "empty", "tables": {}})
    assert '<img class="plot"' not in page
    for stage in ("evaluate", "propensity", "ope", "uplift", "recommend", "train"):
        assert f"<code>causalrec {stage} &lt;config&gt;</code>" in page
    assert "No results are available yet" in page


def test_report_run_from_tables(cfg, tmp_path):
    """collect -> render -> write, from Delta tables written with delta-rs (no Spark needed)."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from causalrec.context import Context

    data = realistic_data()
    for name in ("metrics", "ope_results", "train_runs", "propensity_diagnostics", "uplift_effects"):
        write_deltalake(cfg.table_path(name), pa.Table.from_pylist(data["tables"][name]))
    os.makedirs(cfg.reports_dir, exist_ok=True)
    with open(os.path.join(cfg.reports_dir, "evaluation.json"), "w") as f:
        json.dump(dict(data["evaluation"], metrics=[]), f)
    res = R.run(Context(cfg=cfg))  # the report reads tables with delta-rs: no Spark session is started
    assert os.path.isfile(res["report"]) and res["plots"] == EXPECTED_PLOTS
    with open(res["json"]) as f:
        js = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert len(js["tables"]["metrics"]) == len(data["tables"]["metrics"])
    assert js["summary"] and js["tables"]["ope_results"][0]["estimator"]
    # item rows are summarised, not copied: overall and segment rows stay, items become counts and a curve
    assert {r["level"] for r in js["tables"]["uplift_effects"]} == {"overall", "segment"}
    assert js["uplift_items"]["n_items"] == 40 and js["uplift_items"]["method"] == "dr"


def test_report_summarises_a_large_catalogue_of_item_effects(cfg):
    """uplift_effects holds a row per catalogue item and method: the report loaded them all as Python rows
    and copied them into report.json. It now keeps a bounded summary: the count, a thinned curve and the
    top items, with the newest run's row per item."""
    import pyarrow as pa
    from deltalake import write_deltalake

    n_items = 5000
    rng = np.random.default_rng(1)
    rows = uplift_effects(rng.normal(0.0, 0.03, n_items))
    stale = [dict(r, effect=9.0, ci_low=8.0, ci_high=10.0, created_at="2025-01-01T00:00:00")
             for r in rows if r["level"] == "item" and r["item_id"] == "i7"]
    rows = [dict(r, created_at="2026-01-01T00:00:00") for r in rows] + stale
    write_deltalake(cfg.table_path("uplift_effects"), pa.Table.from_pylist(rows))
    data = R.collect_report_data(cfg)
    items = data["uplift_items"]
    dr = [r for r in rows if r["level"] == "item" and r["method"] == "dr" and r["effect"] != 9.0]
    assert items["n_items"] == n_items and items["method"] == "dr"
    assert items["n_above_zero"] == sum(r["ci_low"] > 0 for r in dr)
    assert len(items["curve"]["share"]) == len(items["curve"]["cum"]) <= R.ITEM_CURVE_POINTS
    assert items["curve"]["share"][-1] == pytest.approx(100.0)
    assert items["curve"]["cum"][-1] == pytest.approx(sum(r["effect"] * r["n"] for r in dr))
    assert items["top"][0]["effect"] == pytest.approx(max(r["effect"] for r in dr))  # not the stale 9.0
    assert all(r["level"] != "item" for r in data["tables"]["uplift_effects"])
    assert len(json.dumps(data)) < 200_000


# --------------------------------------------------------------------------- headless Chromium


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


class CDP:
    """Minimal Chrome DevTools Protocol client over a stdlib WebSocket (RFC 6455, client frames masked)."""

    def __init__(self, ws_url: str, timeout: float = 60):
        u = urllib.parse.urlparse(ws_url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        resp = b""
        while b"\r\n\r\n" not in resp:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("DevTools closed the connection during the handshake")
            resp += chunk
        head, self.buf = resp.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise ConnectionError(f"WebSocket handshake refused: {head[:200]!r}")
        self.next_id = 0
        self.events: list[dict] = []

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("DevTools connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        head = bytearray([0x80 | opcode])
        n = len(payload)
        if n < 126:
            head.append(0x80 | n)
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        masked = (np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)).tobytes()
        self.sock.sendall(bytes(head) + mask + masked)

    def recv(self) -> dict:
        data = b""
        while True:
            b1, b2 = self._exact(2)
            n = b2 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._exact(8))[0]
            payload = self._exact(n)
            op = b1 & 0x0F
            if op == 8:
                raise ConnectionError("DevTools sent close")
            if op == 9:
                self._send_frame(10, payload)
                continue
            data += payload
            if b1 & 0x80:
                return json.loads(data)

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self._send_frame(1, json.dumps({"id": self.next_id, "method": method, "params": params}).encode())
        while True:
            m = self.recv()
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_for(self, event: str, timeout: float = 60) -> dict:
        end = time.time() + timeout
        while time.time() < end:
            for m in self.events:
                if m.get("method") == event:
                    return m
            self.events.append(self.recv())
        raise TimeoutError(f"no {event} within {timeout}s")


def open_in_chromium(page, profile) -> dict:
    """Load ``page`` in headless Chromium; return element state, console errors, requests and a screenshot."""
    binary = _chromium()
    proc = subprocess.Popen(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic", f"--user-data-dir={profile}",
         "--remote-debugging-port=0", "--window-size=1280,1600", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        port_file = profile / "DevToolsActivePort"
        end = time.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None:
                pytest.fail(f"chromium exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
            if time.time() > end:
                pytest.fail("chromium did not open its DevTools port within 60 s")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30).read())
        ws = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
        cdp = CDP(ws)
        for domain in ("Page", "Runtime", "Log", "Network"):
            cdp.call(f"{domain}.enable")
        cdp.call("Page.navigate", url=page.as_uri())
        cdp.wait_for("Page.loadEventFired")
        info = cdp.call("Runtime.evaluate", returnByValue=True, expression="""JSON.stringify({
            imgs: Array.from(document.images).map(i => ({w: i.naturalWidth, h: i.naturalHeight, done: i.complete,
                                                          alt: i.alt})),
            svgs: document.querySelectorAll('svg').length,
            height: document.body.scrollHeight, text: document.body.innerText.length})""")
        shot = base64.b64decode(cdp.call("Page.captureScreenshot", format="png")["data"])
        errors = [m for m in cdp.events if m.get("method") == "Runtime.exceptionThrown"
                  or (m.get("method") == "Runtime.consoleAPICalled" and m["params"].get("type") in ("error", "assert"))
                  or (m.get("method") == "Log.entryAdded" and m["params"]["entry"].get("level") == "error")]
        requests = [m["params"]["request"]["url"] for m in cdp.events if m.get("method") == "Network.requestWillBeSent"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return {"state": json.loads(info["result"]["value"]), "errors": errors, "requests": requests, "shot": shot}


def _needs_chromium():
    if _chromium() is None:
        pytest.skip("chromium not installed: apt-get install chromium")


def test_report_renders_in_headless_chromium(tmp_path):
    _needs_chromium()
    page = tmp_path / "report.html"
    page.write_text(R.render_report(realistic_data()), encoding="utf-8")
    got = open_in_chromium(page, tmp_path / "profile")
    state = got["state"]
    assert got["errors"] == [], f"console errors: {got['errors']}"
    # every plot present and decoded (naturalWidth > 0 means the embedded PNG loaded)
    assert len(state["imgs"]) + state["svgs"] == EXPECTED_PLOTS, state
    bad = [i for i in state["imgs"] if not (i["done"] and i["w"] > 0 and i["h"] > 0)]
    assert not bad, f"images that did not load: {bad}"
    # self-contained: the only loads are the page itself and data: URIs
    external = [u for u in got["requests"] if not (u.startswith("file://") or u.startswith("data:"))]
    assert not external, f"report fetched external resources: {external}"
    assert state["text"] > 500 and state["height"] > 1600
    # a screenshot that is not blank: many distinct colours and a real share of non-white pixels
    import matplotlib.image as mpimg

    img = mpimg.imread(io.BytesIO(got["shot"]), format="png")[..., :3]
    non_white = float((img.min(axis=2) < 0.95).mean())
    colours = len(np.unique((img.reshape(-1, 3) * 255).astype(np.uint8), axis=0))
    assert non_white > 0.02 and colours > 20, (non_white, colours)


def test_chromium_check_catches_console_errors_and_broken_images(tmp_path):
    """The browser check itself must fail on a broken page, or the test above proves nothing."""
    _needs_chromium()
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><body><p>x</p><img src="data:image/png;base64,AAAA">'
                    '<script>console.error("boom")</script></body></html>', encoding="utf-8")
    got = open_in_chromium(page, tmp_path / "profile")
    assert any("boom" in json.dumps(e) for e in got["errors"]), got["errors"]
    assert got["state"]["imgs"][0]["w"] == 0
    import matplotlib.image as mpimg

    img = mpimg.imread(io.BytesIO(got["shot"]), format="png")[..., :3]
    assert float((img.min(axis=2) < 0.95).mean()) < 0.02  # an (almost) blank page is recognised as blank


def test_names_with_dollar_signs_are_drawn_as_text():
    """Matplotlib read text between "$" signs as math: a model, policy or strategy named '$\\foo{$' failed
    to parse and four sections were replaced by "could not be drawn"."""
    data = realistic_data()
    odd = "$\\foo{$"
    for r in data["tables"]["metrics"]:
        r["model"] = r["model"] + odd
    for r in data["tables"]["ope_results"]:
        r["policy"] = r["policy"] + odd
    for r in data["tables"]["train_runs"]:
        r["objective"] = r["objective"] + odd
    data["evaluation"]["models"] = [dict(m, model=m["model"] + odd) for m in data["evaluation"]["models"]]
    page = R.render_report(data)
    assert "could not be drawn" not in page
    assert page.count('<img class="plot"') == EXPECTED_PLOTS


def test_uplift_axes_name_the_value_an_effect_is_a_change_in():
    """The per-item effect axis said "outcome probability" whatever uplift_effects' outcome was; a
    summed value (revenue) is labelled with its event type, a 0/1 outcome (or an older table) as before."""
    from causalrec.report import _effect_outcome

    def data(**overall):
        return {"tables": {"uplift_effects": [{"level": "item", "outcome_binary": True},
                                              {"level": "overall", **overall}]}}

    assert _effect_outcome(data(outcome="purchase", outcome_binary=False)) == "purchase"
    assert _effect_outcome(data(outcome=None, outcome_binary=False)) == "value"
    assert _effect_outcome(data(outcome="purchase", outcome_binary=True)) is None
    assert _effect_outcome(data()) is None and _effect_outcome({"tables": {}}) is None


def test_ranking_rows_of_another_k_or_model_are_not_shown_as_current():
    """recommend with ranking.k=5, then again with k=10: both uplift rows were listed, each as the latest of
    its (policy, K). Only rows of the newest run's K and model version compare with the current list."""
    row = {"policy": "uplift", "k": 5, "gini_before": 0.7, "gini_after": 0.7, "relevance_cost": 0.0, "n_boosted": 0,
           "model_version": "m1", "created_at": "2026-01-01T00:00:00"}
    data = {"tables": {"ranking_summary": [
        row, dict(row, policy="fair", gini_after=0.5, created_at="2026-01-01T00:01:00"),
        dict(row, k=10, created_at="2026-01-02T00:00:00"),
        dict(row, policy="relevance", k=10, model_version="m0", created_at="2025-12-01T00:00:00")]}}
    rows = R._current_rankings(data)
    assert [(r["policy"], r["k"], r["model_version"]) for r in rows] == [("uplift", 10, "m1")]
    assert not any("Fair re-ranking" in s for s in R.summary_sentences(data))
