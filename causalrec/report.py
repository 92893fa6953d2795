"""The ``report`` stage: one self-contained HTML file a person can read, plus a JSON of every number.

Why self-contained: the report is mailed, attached to tickets and opened on
laptops without network access, so every plot is an embedded PNG (matplotlib,
Agg backend) and there is no external script, style sheet or font.

``collect_report_data(cfg)`` reads the small result tables with delta-rs (no
Spark, no JVM) and ``<reports_dir>/evaluation.json`` (curves from the evaluate
stage); ``render_report(data)`` is a pure function from that dict to HTML, so it
is tested without any table.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
from datetime import datetime, timezone
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)

REPORT_TABLES = ("metrics", "train_runs", "ope_results", "propensity_diagnostics", "ranking_summary",
                 "uplift_effects")
FAMILY_ORDER = ("naive", "debiased", "causal")
KEY_METRICS = ("mse", "mae", "auc", "ndcg", "recall", "map", "precision")


# --------------------------------------------------------------------------- data


def collect_report_data(cfg) -> dict:
    """Everything the report shows, as plain JSON-able Python: the result tables, except that
    ``uplift_effects``' item rows (one per catalogue item and method) are reduced to
    :func:`item_effect_summary` (``data["uplift_items"]``), a bounded summary, so a catalogue of
    millions of items reaches neither this process's memory as rows nor ``report.json``."""
    from deltalake import DeltaTable

    # alpha: the level ope_results and uplift_effects intervals are computed at (ope.alpha), for their labels
    data: dict = {"title": cfg.evaluation.report_title, "dataset": cfg.data.source, "alpha": cfg.ope.alpha,
                  "generated_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "tables": {}}
    for name in REPORT_TABLES:
        path = cfg.table_path(name)
        if not DeltaTable.is_deltatable(path):
            continue
        rows = DeltaTable(path).to_pyarrow_dataset()
        if name == "uplift_effects" and "level" in rows.schema.names:
            import pyarrow.dataset as pds

            is_item = pds.field("level") == "item"
            present = [c for c in ITEM_EFFECT_COLUMNS if c in rows.schema.names]
            data["uplift_items"] = item_effect_summary(rows.to_table(columns=present, filter=is_item).to_pandas())
            table = rows.to_table(filter=~is_item | pds.field("level").is_null())
        else:
            table = rows.to_table()
        data["tables"][name] = [{k: _plain(v) for k, v in r.items()} for r in table.to_pylist()]
    ev_path = os.path.join(cfg.reports_dir, "evaluation.json")
    if os.path.isfile(ev_path):
        with open(ev_path) as f:
            ev = json.load(f)
        data["evaluation"] = {k: ev.get(k) for k in ("models", "curves", "missing", "k", "recommendations")}
        if "metrics" not in data["tables"]:
            data["tables"]["metrics"] = ev.get("metrics", [])
    return data


def _plain(v):
    if isinstance(v, datetime):
        return v.isoformat()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _level(data, alphas=None) -> str:
    """The printed level of the OPE and uplift intervals: ``1 - alpha``, alpha = ope.alpha (default 0.05).

    ``alphas``: the alphas the rows shown record (uplift_effects, ope_results), each the alpha of the run
    that computed it (``ope.alpha`` may have changed since); their own level wins when they all agree
    on one."""
    from causalrec.explain import ci_level

    alpha = data.get("alpha")
    own = set(alphas or [])
    if len(own) == 1 and _finite(next(iter(own))):
        alpha = next(iter(own))
    return ci_level(alpha if _finite(alpha) else 0.05)


def _latest(rows, keys: tuple) -> list[dict]:
    """The newest row (``created_at``) per ``keys``, in that order. Tables every run appends to
    (ranking_summary, train_runs) keep older runs' rows: shown as they are, they read as current."""
    latest: dict = {}
    for r in sorted(rows or [], key=lambda r: str(r.get("created_at") or "")):
        latest[tuple(r.get(k) for k in keys)] = r
    return sorted(latest.values(), key=lambda r: str(r.get("created_at") or ""))


def _current_rankings(data) -> list[dict]:
    """ranking_summary rows comparable with the current recommendations: the latest row per policy among
    the rows of the newest run's K and model version. Why: every recommend run appends a row, and a row
    of another K (or of an older model's scores) kept as "the latest of its (policy, K)" read as current
    beside the run that replaced it."""
    rows = data.get("tables", {}).get("ranking_summary") or []
    if not rows:
        return []
    newest = max(rows, key=lambda r: str(r.get("created_at") or ""))
    same = [r for r in rows if r.get("k") == newest.get("k") and r.get("model_version") == newest.get("model_version")]
    return _latest(same, ("policy",))


# --------------------------------------------------------------------------- plotting


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    # labels are names from configs and tables (models, policies, strategies): a "$" in one is text, not
    # the start of a math expression that fails to parse and blanks the section
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt


def _fig_html(fig, alt: str, caption: str) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    b64 = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<figure><img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _missing(what: str, stage: str) -> str:
    return (f'<p class="missing">{html.escape(what)} is not available: run the <code>{html.escape(stage)}</code> '
            f"stage (<code>causalrec {html.escape(stage)} &lt;config&gt;</code>), then <code>evaluate</code> and "
            "<code>report</code> again.</p>")


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _table(headers: list, rows: list) -> str:
    h = "".join(f"<th>{html.escape(str(x))}</th>" for x in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c) if not isinstance(c, str) else html.escape(c)}</td>" for c in r)
                   + "</tr>" for r in rows)
    return f'<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


# --------------------------------------------------------------------------- sections


def _metrics(data) -> list[dict]:
    return list(data.get("tables", {}).get("metrics") or [])


def _curves(data) -> dict:
    return (data.get("evaluation") or {}).get("curves") or {}


def _model_family(data) -> dict:
    fam = {}
    for m in (data.get("evaluation") or {}).get("models") or []:
        fam[m.get("model")] = m.get("family")
    for r in _metrics(data):
        try:
            d = json.loads(r.get("details_json") or "{}")
        except ValueError:
            d = {}
        if d.get("family") and r["model"] not in fam:
            fam[r["model"]] = d["family"]
    return fam


def _primary_slice(rows: list[dict]) -> Optional[str]:
    slices = {r["slice"] for r in rows}
    for s in ("mcar_test", "mnar_test_snips", "mnar_test_ips", "mnar_test"):
        if s in slices:
            return s
    return None


def _model_rows(data) -> tuple[Optional[str], list[str], dict]:
    """(slice, models in naive/debiased/causal order, {(model, metric, k): row})."""
    rows = [r for r in _metrics(data) if not str(r["model"]).startswith("policy:") and r["metric"] in KEY_METRICS]
    sl = _primary_slice(rows)
    rows = [r for r in rows if r["slice"] == sl]
    fam = _model_family(data)
    models = sorted({r["model"] for r in rows},
                    key=lambda m: (FAMILY_ORDER.index(fam[m]) if fam.get(m) in FAMILY_ORDER else 9, m))
    return sl, models, {(r["model"], r["metric"], r.get("k")): r for r in rows}


ITEM_EFFECT_COLUMNS = ("item_id", "method", "effect", "ci_low", "ci_high", "n", "alpha", "created_at")
ITEM_CURVE_POINTS = 1001  # a plot's worth of the uplift curve over items
ITEM_TOP = 20  # the largest per-item effects, drawn with their intervals


def item_effect_summary(items) -> Optional[dict]:
    """What the report shows of uplift_effects' item-level rows (a pandas frame): the primary method's
    latest row per item, counted, the Qini-style curve over items thinned to :data:`ITEM_CURVE_POINTS`
    and the :data:`ITEM_TOP` largest effects. None when there is no item with a finite effect.

    One method and one row per item: uplift_effects also holds every estimate once per method, and
    counting or plotting them all would show several "items" per item."""
    import pandas as pd

    from causalrec.uplift import primary_method

    if items is None or not len(items):
        return None
    items = items.assign(effect=pd.to_numeric(items["effect"], errors="coerce"))
    items = items[items["item_id"].notna() & np.isfinite(items["effect"].astype("float64"))]
    method = primary_method(items["method"].unique()) if "method" in items.columns else None
    if method is not None:
        items = items[items["method"] == method]
    if not len(items):
        return None
    if "created_at" in items.columns:  # one row per item: the latest run's
        items = items.assign(_at=items["created_at"].astype(str)).sort_values("_at", kind="stable")
    items = items.drop_duplicates("item_id", keep="last").sort_values("effect", ascending=False, kind="stable")
    def col(c: str) -> np.ndarray:
        return pd.to_numeric(items[c], errors="coerce").to_numpy("float64") if c in items.columns \
            else np.full(len(items), np.nan)

    effect, lo, hi = col("effect"), col("ci_low"), col("ci_high")
    n = np.maximum(np.nan_to_num(col("n"), nan=1.0), 1.0)
    cum = np.concatenate([[0.0], np.cumsum(effect * n)])
    share = np.concatenate([[0.0], np.cumsum(n) / n.sum() * 100])
    keep = np.unique(np.linspace(0, len(n), min(len(n) + 1, ITEM_CURVE_POINTS)).round().astype(int))
    alphas = sorted({float(a) for a in col("alpha") if np.isfinite(a)})
    top = [{"item_id": str(i), "effect": float(e), "ci_low": _plain(float(a)), "ci_high": _plain(float(b))}
           for i, e, a, b in zip(items["item_id"][:ITEM_TOP], effect[:ITEM_TOP], lo[:ITEM_TOP], hi[:ITEM_TOP])]
    return {"method": method, "n_items": int(len(items)), "n_above_zero": int(np.sum(np.nan_to_num(lo, nan=-np.inf) > 0)),
            "alphas": alphas, "curve": {"share": share[keep].tolist(), "cum": cum[keep].tolist()}, "top": top}


def _item_summary(data) -> Optional[dict]:
    """:func:`item_effect_summary` as :func:`collect_report_data` stored it, else of the item rows a
    caller put in ``tables.uplift_effects`` itself."""
    if "uplift_items" in data:
        return data["uplift_items"]
    import pandas as pd

    rows = [r for r in data.get("tables", {}).get("uplift_effects") or [] if r.get("level", "item") == "item"]
    return item_effect_summary(pd.DataFrame(rows)) if rows else None


def _get(index, model, metric, k=None):
    """The metric's value; None when there is no row or its value is not a finite number (NaN reads back as None)."""
    r = index.get((model, metric, k))
    v = None if r is None else r.get("value")
    return v if _finite(v) else None


def summary_sentences(data) -> list[str]:
    """Plain-language findings generated from the numbers (never hand-written)."""
    out = []
    sl, models, idx = _model_rows(data)
    fam = _model_family(data)
    ks = sorted({k for (_, _, k) in idx if k is not None})
    slice_words = {"mcar_test": "randomly-exposed (MCAR) test ratings",
                   "mnar_test_snips": "logged test data, SNIPS-debiased",
                   "mnar_test_ips": "logged test data, IPS-debiased",
                   "mnar_test": "logged (biased) test data"}.get(sl or "", sl)
    naive = next((m for m in models if fam.get(m) == "naive"), None)
    others = [m for m in models if m != naive]
    for m in others:
        label = f"the {fam.get(m) or ''} model ({m})".replace("the  model", "the model")
        for metric, better in (("mse", "lower"), ("ndcg", "higher")):
            k = None if metric == "mse" else (max(ks) if ks else None)
            a, b = _get(idx, m, metric, k), _get(idx, naive, metric, k) if naive else None
            name = metric.upper() + (f"@{k}" if k else "")
            if a is not None and b is not None:
                diff = (a - b) / abs(b) * 100 if b else float("nan")
                word = "lower" if a < b else "higher"
                verdict = "better" if word == better else "worse"
                out.append(f"On {slice_words}, {label} has {name} {a:.3f} versus {b:.3f} for the naive model "
                           f"({naive}): {abs(diff):.1f}% {word}, i.e. {verdict}.")
    if not out and models:
        m = models[0]
        for metric in ("mse", "auc"):
            v = _get(idx, m, metric)
            if v is not None:
                why = "no other model to compare with" if len(models) == 1 else "no naive model to compare with"
                out.append(f"On {slice_words}, {m} has {metric.upper()} {v:.3f} ({why}).")
    ope = data.get("tables", {}).get("ope_results") or []
    dr = [r for r in ope if r.get("estimator") in ("dr", "snips", "ips") and _finite(r.get("estimate"))]
    if dr:
        est = "dr" if any(r["estimator"] == "dr" for r in dr) else dr[0]["estimator"]
        best = max((r for r in dr if r["estimator"] == est), key=lambda r: r["estimate"])
        ci = (f" ({_level(data, [best.get('alpha')])} CI {best['ci_low']:.4f} to {best['ci_high']:.4f})"
              if _finite(best.get("ci_low")) and _finite(best.get("ci_high")) else "")
        out.append(f"Off-policy evaluation ({est.upper()}) ranks strategy '{best['policy']}' highest with an "
                   f"estimated reward of {best['estimate']:.4f}{ci}.")
    rs = _current_rankings(data)
    fair = [r for r in rs if r.get("policy") == "fair" and _finite(r.get("gini_before")) and _finite(r.get("gini_after"))]
    if fair:
        r = fair[-1]
        cost = f" at a relevance cost of {r['relevance_cost'] * 100:.1f}%" if _finite(r.get("relevance_cost")) else ""
        out.append(f"Fair re-ranking moves the Gini of recommendation counts across items from "
                   f"{r['gini_before']:.3f} to {r['gini_after']:.3f}{cost} (0 = every item recommended equally "
                   "often, 1 = one item gets every slot).")
    else:
        lor = _curves(data).get("lorenz") or {}
        base = next((c for c in lor.values() if c.get("before_fair_reranking")), {})
        if "fair" in lor and _finite(base.get("gini")) and _finite(lor["fair"].get("gini")):
            out.append(f"Fair re-ranking moves the Gini of position-discounted exposure across items from "
                       f"{base['gini']:.3f} to {lor['fair']['gini']:.3f}.")
    for r in _metrics(data):
        if r["metric"] == "weight_ess" and _finite(r.get("value")):
            try:
                ratio = json.loads(r.get("details_json") or "{}").get("ess_ratio")
            except ValueError:
                ratio = None
            if _finite(ratio):
                out.append(f"The inverse-propensity weights keep an effective sample size of {r['value']:.0f} "
                           f"({ratio * 100:.1f}% of the observed rows): the lower this is, the noisier every "
                           "IPS-based number in this report.")
    eff = _item_summary(data)
    if eff:
        how = f" ({eff['method'].upper()} estimates)" if eff["method"] else ""
        out.append(f"{eff['n_above_zero']} of {eff['n_items']} items have a recommendation effect whose "
                   f"{_level(data, eff['alphas'])} interval lies above zero{how}.")
    if not out:
        out.append("No results are available yet: run the pipeline stages listed in each section below.")
    return out


def section_models(data) -> str:
    sl, models, idx = _model_rows(data)
    if not models:
        return _missing("Model comparison", "evaluate")
    fam = _model_family(data)
    ks = sorted({k for (_, _, k) in idx if k is not None})
    cols = [(m, None) for m in ("mse", "mae", "auc") if any((x, m, None) in idx for x in models)]
    cols += [(m, k) for k in ks for m in ("ndcg", "recall", "map") if any((x, m, k) in idx for x in models)]
    head = ["model", "family"] + [f"{m.upper()}{'@' + str(k) if k else ''}" for m, k in cols]
    rows = []
    for m in models:
        row = [m, fam.get(m) or "–"]
        for metric, k in cols:
            r, v = idx.get((m, metric, k)), _get(idx, m, metric, k)
            if v is None:  # no row, or a NaN value: a dash in this cell, the table still renders
                row.append("–")
            elif _finite(r.get("ci_low")) and _finite(r.get("ci_high")):
                row.append(f"{v:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}]")
            else:
                row.append(f"{v:.4f}")
        rows.append(row)
    plt = _plt()
    top_k = max(ks) if ks else None
    plot_cols = [c for c in cols if c == ("mse", None) or c == ("ndcg", top_k)] or cols[:2]
    fig, axes = plt.subplots(1, len(plot_cols), figsize=(5.2 * len(plot_cols), 3.6), squeeze=False)
    for ax, (metric, k) in zip(axes[0], plot_cols):
        vals = [_get(idx, m, metric, k) for m in models]
        lo = [idx.get((m, metric, k), {}).get("ci_low") for m in models]
        hi = [idx.get((m, metric, k), {}).get("ci_high") for m in models]
        err = [[max(v - l, 0.0) if _finite(l) and _finite(v) else 0 for v, l in zip(vals, lo)],
               [max(h - v, 0.0) if _finite(h) and _finite(v) else 0 for v, h in zip(vals, hi)]]
        colors = ["#888888" if fam.get(m) == "naive" else "#2b7bba" if fam.get(m) == "debiased" else "#d9822b"
                  for m in models]
        # a missing value gets no bar (a bar of 0 reads as a perfect MSE) and says so under its name
        ax.bar(range(len(models)), [v if _finite(v) else float("nan") for v in vals], yerr=err, color=colors,
               capsize=4)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels([m if _finite(v) else f"{m}\n(no value)" for m, v in zip(models, vals)],
                           rotation=20, ha="right", fontsize=8)
        name = metric.upper() + (f"@{k}" if k else "")
        ax.set_ylabel(name + (_mse_unit([idx.get((m, metric, k)) for m in models]) if metric == "mse" else " (0 to 1)"))
        ax.set_title(f"{name} by model, {sl} (95% CI)")  # evaluation metrics: 95% intervals (metrics.Z95)
    fig_html = _fig_html(fig, "model comparison bar chart",
                         f"Naive vs debiased vs causal models on slice '{sl}'. Grey = naive, blue = debiased, "
                         "orange = causal; error bars are 95% intervals.")
    return fig_html + _table(head, rows)


def _mse_unit(rows: list) -> str:
    """A rating model's MSE is in rating points squared; a click model's (target ``outcome``, a 0/1
    label against a probability) is the Brier score."""
    targets = set()
    for r in rows:
        try:
            targets.add(json.loads((r or {}).get("details_json") or "{}").get("target"))
        except ValueError:
            targets.add(None)
    if targets == {"outcome"}:
        return " (squared error on the probability scale)"
    if targets == {"label"}:
        return " (rating points squared)"
    return " (squared error in each model's unit)"


def _histogram_axes(plt, hist: dict, colour: str):
    """A figure with the pre-binned histogram ``{"edges": [...], "counts": [...]}`` drawn as bars.

    Histograms are binned in Spark (no event-scale collect), so the report only draws bars.
    """
    fig, ax = plt.subplots(figsize=(6, 3.4))
    e = hist["edges"]
    ax.bar(e[:-1], hist["counts"], width=[b - a for a, b in zip(e[:-1], e[1:])], align="edge", color=colour,
           edgecolor="white")
    return fig, ax


def section_propensity(data) -> str:
    parts = []
    plt = _plt()
    cur = _curves(data)
    ph = cur.get("propensity_hist")
    if ph and ph.get("counts"):
        fig, ax = _histogram_axes(plt, ph, "#2b7bba")
        ax.set_xlabel("exposure propensity P(observed | user, item)")
        ax.set_ylabel("observed pairs (count)")
        ax.set_title("Exposure propensity of observed pairs")
        parts.append(_fig_html(fig, "propensity histogram",
                               f"Distribution of estimated exposure propensities over {ph.get('n', 0)} observed pairs. "
                               "Mass near zero means large inverse weights."))
    else:
        parts.append(_missing("The propensity histogram", "propensity"))
    # calibration: reliability bins from propensity_diagnostics, else the models' calibration curves
    diag = data.get("tables", {}).get("propensity_diagnostics") or []
    rel = [r for r in diag if r.get("metric") == "reliability" and _finite(r.get("pred_mean"))
           and _finite(r.get("obs_rate"))]
    model_cal = cur.get("calibration") or {}
    if rel or model_cal:
        fig, ax = plt.subplots(figsize=(5, 4.2))
        ax.plot([0, 1], [0, 1], ls="--", color="#999999", label="perfect calibration")
        by = {}
        for r in rel:
            by.setdefault(f"{r.get('propensity')} propensity ({r.get('method')})", []).append(r)
        eces = {(r.get("propensity"), r.get("method")): r.get("value") for r in diag if r.get("metric") == "ece"}
        for name, rs in sorted(by.items()):
            rs = sorted(rs, key=lambda r: r.get("bin") or 0)
            key = (rs[0].get("propensity"), rs[0].get("method"))
            lab = name + (f", ECE {eces[key]:.3f}" if _finite(eces.get(key)) else "")
            ax.plot([r["pred_mean"] for r in rs], [r["obs_rate"] for r in rs], marker="o", label=lab)
        for name, cal in sorted(model_cal.items()):
            bins = cal.get("bins") or []
            ece = cal.get("ece")
            ax.plot([b["mean_predicted"] for b in bins], [b["observed_rate"] for b in bins], marker="s",
                    label=f"{name}" + (f", ECE {ece:.3f}" if _finite(ece) else ""))
        ax.set_xlabel("mean predicted probability in bin")
        ax.set_ylabel("observed rate in bin")
        ax.set_title("Calibration (reliability) curve")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper left")
        parts.append(_fig_html(fig, "calibration curve",
                               "Points on the diagonal mean predicted probabilities match observed rates; "
                               "ECE is the bin-weighted mean gap."))
        scal = [[r.get("propensity"), r.get("method"), r.get("metric"), r.get("value")] for r in diag
                if r.get("bin") is None and _finite(r.get("value"))]
        if scal:
            parts.append(_table(["propensity", "method", "diagnostic", "value"], scal))
    else:
        parts.append(_missing("The propensity calibration curve", "propensity"))
    wh = cur.get("weight_hist")
    if wh and wh.get("counts"):
        fig, ax = _histogram_axes(plt, wh, "#d9822b")
        ax.set_xlabel("log10 of inverse-propensity weight 1/p" if wh.get("log10") else "inverse-propensity weight 1/p")
        ax.set_ylabel("observed pairs (count)")
        ax.set_yscale("log")
        ax.set_title("Inverse-propensity weight distribution")
        ess = [r for r in _metrics(data) if r["metric"] == "weight_ess"]
        cap = "Heavy right tails (weights far above 1) dominate IPS estimates; clipping trades that variance for bias."
        if ess and _finite(ess[0].get("value")):  # NaN reads back as None
            cap += f" Effective sample size of the weights: {ess[0]['value']:.0f}."
        parts.append(_fig_html(fig, "inverse weight distribution", cap))
    else:
        parts.append(_missing("The inverse-weight distribution", "propensity"))
    return "".join(parts)


def section_ope(data) -> str:
    ope = [r for r in data.get("tables", {}).get("ope_results") or [] if _finite(r.get("estimate"))]
    if not ope:
        return _missing("Off-policy estimates", "ope")
    plt = _plt()
    runs = sorted({r.get("run_id") for r in ope})
    ope = [r for r in ope if r.get("run_id") == runs[-1]]  # latest run only
    policies = sorted({r["policy"] for r in ope})
    estimators = sorted({r["estimator"] for r in ope})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(policies) * max(1, len(estimators)) ** 0.5), 4))
    width = 0.8 / max(len(estimators), 1)
    for j, est in enumerate(estimators):
        xs, ys, lo, hi = [], [], [], []
        for i, p in enumerate(policies):
            r = next((r for r in ope if r["policy"] == p and r["estimator"] == est), None)
            if r is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(r["estimate"])
            lo.append(max(r["estimate"] - r["ci_low"], 0.0) if _finite(r.get("ci_low")) else 0)
            hi.append(max(r["ci_high"] - r["estimate"], 0.0) if _finite(r.get("ci_high")) else 0)
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, label=est)
    ax.set_xticks(range(len(policies)))
    ax.set_xticklabels(policies, rotation=15)
    ax.set_xlabel("strategy (evaluated policy)")
    ax.set_ylabel("estimated reward per impression")
    level = _level(data, [r.get("alpha") for r in ope])
    ax.set_title(f"Off-policy estimates with {level} intervals")
    ax.legend(fontsize=7, ncol=2)
    rows = [[r["policy"], r["estimator"], r["estimate"], r.get("ci_low"), r.get("ci_high"), r.get("interval_method") or "–",
             r.get("ess"), r.get("diff_to_baseline")] for r in sorted(ope, key=lambda r: (r["policy"], r["estimator"]))]
    logged = sorted({r["logged_policy"] for r in ope if r.get("logged_policy")})
    pi_b = f" The logging policy's probabilities (pi_b) came from: {', '.join(logged)}." if logged else ""
    return _fig_html(fig, "off-policy estimates", "Each point is one estimator's estimate of the strategy's reward; "
                     f"bars are {level} intervals. Estimators that agree give confidence; wide IPS bars mean "
                     f"extreme weights.{pi_b}") + \
        _table(["strategy", "estimator", "estimate", "CI low", "CI high", "interval", "ESS", "diff to baseline"], rows)


def _effect_outcome(data) -> Optional[str]:
    """None when uplift_effects' outcome is 0/1 (effects are probability changes; a table that did not
    record it was such), else the event type whose summed value the effects change ("value" unnamed)."""
    from causalrec.explain import PROBABILITY
    from causalrec.uplift import EffectScale

    overall = [r for r in data.get("tables", {}).get("uplift_effects") or [] if r.get("level") == "overall"]
    scale = EffectScale.of(overall[0] if overall else None)
    return None if scale.unit == PROBABILITY else (scale.outcome or "value")


def section_uplift(data) -> str:
    plt = _plt()
    qini = _curves(data).get("qini") or {}
    parts = []
    if qini:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, q in sorted(qini.items()):
            coef = q.get("qini_coefficient")
            ax.plot([x * 100 for x in q["x"]], q["y"], marker=".",
                    label=f"{name}" + (f" (Qini coeff. {coef:.4f})" if _finite(coef) else ""))
            ax.plot([x * 100 for x in q["x"]], q["random"], ls="--", color="#999999")
        ax.set_xlabel("share of pairs targeted, highest predicted uplift first (%)")
        ax.set_ylabel("incremental outcomes (count)")
        ax.set_title("Qini curve")
        ax.legend(fontsize=7)
        weighted = all(q.get("propensity_weighted") for q in qini.values())
        parts.append(_fig_html(fig, "qini curve", "Qini curve: incremental positive outcomes gained by recommending to the pairs "
                               "with the highest predicted effect first; the dashed line is random targeting." +
                               (" Treated and control outcomes are weighted by the inverse of the logged treatment "
                                "propensity, so a policy's targeting is not credited to the model." if weighted else
                                " The arms are compared unweighted (no treatment propensity was logged or estimated).")))
    ue = _item_summary(data)
    if ue:
        share, cum = ue["curve"]["share"], ue["curve"]["cum"]
        fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8))
        axes[0].plot(share, cum, color="#d9822b", label="items by estimated effect")
        axes[0].plot([0, 100], [0, cum[-1]], ls="--", color="#999999", label="random order")
        axes[0].set_xlabel("share of logged pairs, items sorted by estimated effect (%)")
        outcome = _effect_outcome(data)
        axes[0].set_ylabel("cumulative incremental outcomes (count)" if outcome is None
                           else f"cumulative incremental {outcome} value")
        axes[0].set_title("Uplift (Qini-style) curve over items")
        axes[0].legend(fontsize=7)
        top = ue["top"]
        lo = [max(r["effect"] - r["ci_low"], 0.0) if _finite(r.get("ci_low")) else 0 for r in top]
        hi = [max(r["ci_high"] - r["effect"], 0.0) if _finite(r.get("ci_high")) else 0 for r in top]
        axes[1].errorbar(range(len(top)), [r["effect"] for r in top], yerr=[lo, hi], fmt="o", capsize=3)
        axes[1].axhline(0, color="#999999", lw=1)
        axes[1].set_xlabel("item (top 20 by estimated effect)")
        axes[1].set_ylabel("effect of recommending (outcome probability)" if outcome is None
                           else f"effect of recommending ({outcome} value)")
        axes[1].set_title(f"Per-item effects with {_level(data, ue['alphas'])} intervals")
        parts.append(_fig_html(fig, "uplift per item", "Left: cumulative estimated incremental outcomes when items are "
                               "recommended in order of estimated effect. Right: the largest per-item effects."))
    if not parts:
        return _missing("The uplift (Qini) curve", "uplift")
    return "".join(parts)


def section_exposure(data) -> str:
    lor = _curves(data).get("lorenz") or {}
    if not lor:
        return _missing("The exposure Lorenz curve", "recommend")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    ax.plot([0, 100], [0, 100], ls="--", color="#999999", label="equal exposure")
    # "before": the list the fair re-ranker started from (ranking.fair_base_policy's top-K), as evaluate marks it
    order = sorted(lor, key=lambda p: (not lor[p].get("before_fair_reranking"), p != "fair", p))
    for p in order:
        c = lor[p]
        tag = " (before fair re-ranking)" if c.get("before_fair_reranking") else \
            " (after fair re-ranking)" if p == "fair" else ""
        g = c.get("gini")
        ax.plot([x * 100 for x in c["x"]], [y * 100 for y in c["y"]],
                label=f"{p}{tag}" + (f", Gini {g:.3f}" if _finite(g) else ""))
    ax.set_xlabel("share of catalogue items, least exposed first (%)")
    ax.set_ylabel("cumulative share of exposure (%)")
    ax.set_title("Exposure Lorenz curve")
    ax.legend(fontsize=7, loc="upper left")
    out = _fig_html(fig, "exposure lorenz curve", "Position-discounted exposure of items in the top-K lists; the "
                    "further below the diagonal, the more exposure is concentrated on few items.")
    rows = []
    for r in _metrics(data):
        if str(r["model"]).startswith("policy:") and (r["metric"] in ("exposure_gini", "catalog_coverage")
                                                     or r["metric"].startswith("exposure_share:")):
            name = "Gini of position-discounted exposure" if r["metric"] == "exposure_gini" else r["metric"]
            rows.append([r["model"][7:], name, r.get("k"), r["value"]])
    rs = _current_rankings(data)
    if rs:
        # ranking_summary's Gini is of plain slot counts; the Lorenz curve's (exposure_gini) is position-discounted
        out += _table(["policy", "K", "Gini of recommendation counts before", "Gini of recommendation counts after",
                       "relevance cost", "boosted", "model version", "run at"],
                      [[r.get("policy"), r.get("k"), r.get("gini_before"), r.get("gini_after"), r.get("relevance_cost"),
                        r.get("n_boosted"), r.get("model_version"), r.get("created_at")] for r in rs])
    if rows:
        out += _table(["policy", "metric", "K", "value"], sorted(rows, key=lambda r: (r[0], r[1])))
    return out


def _epochs(run: dict) -> list[dict]:
    try:
        m = json.loads(run.get("metrics_json") or "{}")
    except ValueError:
        return []
    if isinstance(m, dict):
        m = m.get("epochs") or m.get("history") or []
    return [e for e in m if isinstance(e, dict)]


def section_training(data) -> str:
    # the latest run per (model, objective): the runs the evaluate stage grades
    runs = [r for r in _latest(data.get("tables", {}).get("train_runs"), ("model", "objective")) if _epochs(r)]
    if not runs:
        return _missing("Training curves", "train")
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8))
    for r in sorted(runs, key=lambda r: str(r.get("created_at"))):
        ep = _epochs(r)
        label = f"{r.get('model')}:{r.get('objective')}"
        xs = [int(e.get("epoch", i)) + 1 for i, e in enumerate(ep)]
        tl = [e.get("train_loss") for e in ep]
        vl = [e.get("valid_metric") for e in ep]
        axes[0].plot([x for x, v in zip(xs, tl) if _finite(v)], [v for v in tl if _finite(v)], marker="o", label=label)
        axes[1].plot([x for x, v in zip(xs, vl) if _finite(v)], [v for v in vl if _finite(v)], marker="o", label=label)
    axes[0].set_title("Training loss per epoch")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("objective loss (weighted, per example)")
    axes[1].set_title("Validation metric per epoch (lower is better)")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("validation loss (debiased as configured)")
    for ax in axes:
        ax.legend(fontsize=7)
    rows = [[r.get("run_id"), r.get("model"), r.get("objective"), len(_epochs(r)), r.get("best_epoch"),
             r.get("created_at")] for r in runs]
    return _fig_html(fig, "training curves", "Loss on the training split and the validation metric after each epoch; "
                     "early stopping keeps the best validation epoch. The latest run of each model and objective.") + \
        _table(["run", "model", "objective", "epochs", "best epoch (0-based)", "run at"], rows)


def section_all_metrics(data) -> str:
    rows = _metrics(data)
    if not rows:
        return _missing("The metrics table", "evaluate")
    rows = sorted(rows, key=lambda r: (str(r["model"]), str(r["slice"]), str(r["metric"]), r.get("k") or 0))
    return _table(["model", "slice", "metric", "K", "value", "CI low", "CI high", "n"],
                  [[r["model"], r["slice"], r["metric"], r.get("k"), r.get("value"), r.get("ci_low"), r.get("ci_high"),
                    r.get("n")] for r in rows])


CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0 auto;max-width:1100px;padding:16px 24px;
color:#222;background:#fff;line-height:1.45}
h1{font-size:1.6em;margin-bottom:0}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:2em}
.meta{color:#666;font-size:.9em}.summary{background:#f3f7fb;border-left:4px solid #2b7bba;padding:8px 16px}
table{border-collapse:collapse;font-size:.85em;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}figure{margin:12px 0}
img.plot{max-width:100%;height:auto;border:1px solid #eee}figcaption{color:#555;font-size:.85em}
.missing{background:#fff6e5;border-left:4px solid #e0a000;padding:6px 12px}
code{background:#f4f4f4;padding:0 3px}details{margin-top:8px}
"""


def render_report(data: dict) -> str:
    """The whole report as one HTML string (pure: no I/O besides rendering plots in memory)."""
    title = data.get("title") or "causalrec report"
    sections = [
        ("Models side by side: naive vs debiased vs causal", section_models),
        ("Propensities: distribution, calibration and inverse weights", section_propensity),
        ("Off-policy estimates per strategy", section_ope),
        ("Uplift: the causal effect of recommending", section_uplift),
        ("Exposure fairness: Lorenz curve before and after fair re-ranking", section_exposure),
        ("Training curves", section_training),
    ]
    body = []
    for heading, fn in sections:
        try:
            content = fn(data)
        except Exception as exc:  # one broken input must not hide the rest of the report
            log.exception("report section %r failed", heading)
            content = f'<p class="missing">This section could not be drawn: {html.escape(repr(exc))}</p>'
        body.append(f"<section><h2>{html.escape(heading)}</h2>{content}</section>")
    missing = (data.get("evaluation") or {}).get("missing") or {}
    miss_html = ""
    if missing:
        miss_html = "<details><summary>Inputs the evaluate stage did not find</summary>" + _table(
            ["input", "why"], [[k, str(v)] for k, v in sorted(missing.items())]) + "</details>"
    summary = "".join(f"<li>{html.escape(s)}</li>" for s in summary_sentences(data))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{CSS}</style></head>
<body><h1>{html.escape(title)}</h1>
<p class="meta">Data set: {html.escape(str(data.get('dataset') or '–'))} · generated {html.escape(str(data.get('generated_at') or ''))}</p>
<div class="summary"><h2 style="border:0;margin-top:.5em">Summary</h2><ul>{summary}</ul></div>
{''.join(body)}
<section><h2>All metrics</h2><details><summary>Every number in the metrics table</summary>{section_all_metrics(data)}</details></section>
{miss_html}
</body></html>
"""


def run(ctx) -> dict:
    """Write ``<reports_dir>/report.html`` and ``report.json``; returns their paths."""
    from causalrec.evaluation.job import write_json

    cfg = ctx.cfg
    with ctx.step("report: collect"):
        data = collect_report_data(cfg)
    data["summary"] = summary_sentences(data)
    with ctx.step("report: render"):
        page = render_report(data)
    os.makedirs(cfg.reports_dir, exist_ok=True)
    path = os.path.join(cfg.reports_dir, "report.html")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    json_path = write_json(cfg.reports_dir, "report.json", data)
    print(path)
    return {"report": path, "report_path": path, "json": json_path, "bytes": len(page.encode("utf-8")),
            "tables": sorted(data.get("tables", {})), "plots": page.count('<img class="plot"')}
