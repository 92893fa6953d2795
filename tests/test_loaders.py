"""Real-data loaders: counts match the source files; missing or malformed files fail clearly."""
from __future__ import annotations

import json
import shutil

import pytest
from conftest import data_dir


def test_coat_ingests_into_delta_with_source_counts(ctx):
    from causalrec.ingest import job

    ctx.cfg.data.source, ctx.cfg.data.path = "coat", str(data_dir("coat"))
    out = job.run(ctx)
    st = ctx.store
    assert st.row_count("events") == 6960 and st.row_count("mcar_events") == 4640
    assert st.row_count("users") == 290 and st.row_count("items") == 300
    assert out["tables"]["events"]["rows_quarantined"] == 0
    ev = st.read("events")
    assert ev.where("event_type != 'rating' or value < 1 or value > 5").count() == 0
    assert ev.select("user_id").distinct().count() == 290
    assert ev.groupBy("user_id").count().where("count != 24").count() == 0  # 24 self-selected per user
    mc = st.read("mcar_events")
    assert mc.groupBy("user_id").count().where("count != 16").count() == 0
    row = ev.where("event_id = 'coat:train:u0:i72'").collect()[0]
    assert row.user_id == "u0" and row.item_id == "i72" and row.value == 2.0
    assert json.loads(row.context)["split"] == "train"
    items = st.read_arrow("items").to_pandas().set_index("item_id")
    assert items.loc["i0", "category"] == "bomber"
    assert items.loc["i0", "text"].startswith("men's bomber jacket")
    assert "jackettype:bomber" in list(items.loc["i0", "attributes"])
    users = st.read_arrow("users").to_pandas().set_index("user_id")
    assert set(users["segment"]) == {"men", "women"}
    assert any(t.startswith("gender:") for t in users.loc["u0", "attributes"])


def test_coat_malformed_or_missing_files_name_the_file(spark, tmp_path):
    from causalrec.loaders import DataFileError
    from causalrec.loaders.coat import load_coat

    src = data_dir("coat")
    shutil.copytree(src, tmp_path / "coat")
    bad = tmp_path / "coat" / "train.ascii"
    bad.chmod(0o644)
    bad.write_text("1 2 3\n4 5 6\n")
    with pytest.raises(DataFileError, match=r"train\.ascii.*2x3, expected 290x300"):
        load_coat(spark, tmp_path / "coat")
    bad.unlink()
    with pytest.raises(DataFileError, match=r"missing data file .*train\.ascii"):
        load_coat(spark, tmp_path / "coat")


def test_obd_loads_both_policies_and_all_campaigns(spark):
    from pyspark.sql import functions as F

    from causalrec.loaders.obd import load_obd

    d = load_obd(spark, data_dir("obd"))
    ev = d.events
    per = (ev.withColumn("log", F.regexp_extract("event_id", r"^obd:(\w+:\w+):", 1))
           .groupBy("log", "policy").count().toPandas())
    assert len(per) == 6 and (per["count"] == 10_000).all()
    assert set(per["policy"]) == {"random", "bts"}
    assert d.items.count() == 80 + 34 + 46
    # coalesce: a null makes the condition null, not true, and would pass unnoticed
    bad = ev.where("coalesce(event_type != 'impression' or not recommended or position not between 1 and 3 "
                   "or logged_propensity <= 0 or logged_propensity > 1 or value not in (0, 1), true)").count()
    assert bad == 0
    # item ids are namespaced per campaign and exist in the items table
    missing = ev.select("item_id").distinct().join(d.items.select("item_id"), "item_id", "left_anti").count()
    assert missing == 0
    ctx0 = json.loads(ev.where("event_id = 'obd:random:men:0'").first().context)
    assert ctx0["campaign"] == "men" and len(ctx0["affinity"]) == 34 and len(ctx0["user_features"]) == 4


def test_obd_malformed_log_names_the_file(spark, tmp_path):
    from causalrec.loaders import DataFileError
    from causalrec.loaders.obd import load_obd

    f = tmp_path / "random" / "men" / "men.csv"
    f.parent.mkdir(parents=True)
    f.write_text(",timestamp,item_id\n0,2019-11-24,1\n")
    with pytest.raises(DataFileError, match=r"men\.csv: missing column"):
        load_obd(spark, tmp_path, campaigns=["men"], policies=["random"])


def test_amazon_keeps_order_split_and_text(spark):
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from causalrec.loaders.amazon import load_amazon

    d = load_amazon(spark, data_dir("amazon_scientific_unisrec"))
    items = d.items
    assert items.count() == 4385
    assert items.where("text is null or length(text) < 5").count() == 0
    ev = d.events.withColumn("split", F.get_json_object("context", "$.split"))
    splits = ev.groupBy("split").count().toPandas().set_index("split")["count"]
    assert splits["valid"] == 8442 and splits["test"] == 8442
    assert splits.sum() == 59427  # every interaction in the three files, once
    # per user: test is the latest event, valid the one before; times strictly increase with the index
    w = Window.partitionBy("user_id").orderBy(F.col("event_time").desc())
    last = ev.withColumn("r", F.row_number().over(w)).where("r <= 2")
    wrong = last.where("(r = 1 and split != 'test') or (r = 2 and split != 'valid')").count()
    assert wrong == 0
    assert ev.select("item_id").join(items, "item_id", "left_anti").count() == 0
    assert ev.groupBy("user_id", "event_time").count().where("count > 1").count() == 0
    # the test target of user index 0 is item index 13 (Scientific.test.inter, first row)
    u0 = d.users.first().user_id  # users are listed in index order
    t0 = ev.where(f"user_id = '{u0}' and split = 'test'").first()
    from pathlib import Path
    imap = dict(line.split("\t") for line in (Path(data_dir("amazon_scientific_unisrec")) /
                                              "Scientific.item2index").read_text().splitlines())
    assert imap[t0.item_id].strip() == "13"


@pytest.mark.slow
@pytest.mark.parametrize("source, folder, counts", [
    ("obd", "obd", {"events": 60_000, "items": 160}),
    ("amazon", "amazon_scientific_unisrec", {"items": 4385, "users": 8442}),
])
def test_full_ingest_of_obd_and_amazon(ctx, source, folder, counts):
    from causalrec.ingest import job

    ctx.cfg.data.source, ctx.cfg.data.path = source, str(data_dir(folder))
    ctx.cfg.data.earliest_time = "2000-01-01"
    out = job.run(ctx)
    for table, n in counts.items():
        assert ctx.store.row_count(table) == n
    assert out["tables"]["events"]["rows_quarantined"] == 0


def test_malformed_id_map_and_item_context_raise_data_file_error(tmp_path):
    """pandas parse errors in Amazon's id maps and OBD's item_context.csv name the file (DataFileError)."""
    from causalrec.loaders import DataFileError
    from causalrec.loaders.amazon import _read_map
    from causalrec.loaders.obd import _read_items

    imap = tmp_path / "Scientific.item2index"
    imap.write_text("B000A\t0\nB000B\n")  # second line lacks its index
    with pytest.raises(DataFileError, match=r"Scientific\.item2index: cannot be read"):
        _read_map(imap, 2, "item ASIN -> index")
    ctx_csv = tmp_path / "item_context.csv"
    ctx_csv.write_bytes(b'"unterminated\n0,1\n')
    with pytest.raises(DataFileError, match=r"item_context\.csv: cannot be read as CSV"):
        _read_items(ctx_csv, "men")
