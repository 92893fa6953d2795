"""The unclosed-quote check (:func:`causalrec.ingest.sources.unclosed_quotes`, regexes over lines)
against Spark's CSV reader itself, on small random files (quotes, doubled quotes, backslashes, commas,
blanks, line breaks inside quotes; with and without a final line break), seeded.

What the reader does with a file ``P`` (a header ``h``, then the random text) comes from one multiLine
read, with the ingest's options, of the files ``P + "Z\nSENT"``: ``Z`` is neither a delimiter nor a
line break, so the reader treats the end of ``P`` as the end of a file (a quote there cannot take its
fast path, which looks at the next character), and ``SENT`` is a record of its own unless ``P`` ends
inside a quoted field, whose value then holds ``SENT`` and every line break from the line where the
field opens. The second kind of file, ``h``, a lone ``"`` and one of the random lines (so read from
inside a quoted field), shows whether that line's quote ends the field badly (neither a delimiter nor
the line end after it): the reader then keeps the opening quote in the value. The check must give
the same files and lines, and the ingest must read the lines of every such file again (the others it
never checks). The slow variant runs 6,000 files.
"""
from __future__ import annotations

import random

import pytest

SENTINEL = "SENT"
RAW = 'aaa,,""""\\\\ \t\n\n'  # characters for raw lines (weights by repetition)
TOKENS = ["a", "a", ",", '""', '\\"', "\\", "\\\\", " ", "\n"]  # inside a quoted field


def _field(rng: random.Random) -> str:
    content = "".join(rng.choice(TOKENS) for _ in range(rng.randint(0, 5)))
    r = rng.random()
    if r < 0.25:
        return rng.choice(["", "a", "a a", "a\\b", 'a"b'])
    if r < 0.8:
        return '"' + content + '"'
    if r < 0.9:
        return '"' + content  # never closed
    return '"' + content + '"' + rng.choice(["a", " a", '"', "\t"])  # a quote not followed by a delimiter


def _random_text(rng: random.Random) -> str:
    if rng.random() < 0.35:
        text = "".join(rng.choice(RAW) for _ in range(rng.randint(1, 24)))
    else:
        text = "\n".join(",".join(_field(rng) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4)))
    return text.rstrip("\n") + ("\n" if rng.random() < 0.5 else "")


def _cases(seed: int, n_files: int, n_lines: int) -> dict:
    """name -> (file text, kind): ``eof`` files (random text below the header) and ``inside`` files
    (a quoted field opening on line 2, then one line with a quote taken from the random texts)."""
    rng = random.Random(seed)
    cases, lines = {}, set()
    for i in range(n_files):
        text = _random_text(rng)
        cases[f"eof{i:04d}.csv"] = ("h\n" + text, "eof")
        lines.update(x for x in text.split("\n") if '"' in x)
    for i, line in enumerate(rng.sample(sorted(lines), min(n_lines, len(lines)))):
        cases[f"in{i:04d}.csv"] = ('h\n"\n' + line + "\n", "inside")
    return cases


def _spark_says(spark, folder, cases: dict) -> dict:
    """name -> what the unclosed-quote check should give for the file (as ``unclosed_quotes``: a
    ``(line, end)`` pair, or None), from one read of the files with the sentinel appended."""
    from pyspark.sql import functions as F

    from causalrec.ingest.sources import _display_path, csv_reader

    width = max(t.count(",") for t, _ in cases.values()) + 2
    for name, (text, _) in cases.items():
        (folder / name).write_text(text + "Z\n" + SENTINEL)
    cols = [f"c{i}" for i in range(width)]
    rows = (csv_reader(spark).schema(", ".join(f"{c} string" for c in cols)).csv(str(folder))
            .select(F.input_file_name().alias("f"), F.monotonically_increasing_id().alias("i"), *cols).collect())
    records: dict = {}
    for r in sorted(rows, key=lambda r: r["i"]):
        records.setdefault(_display_path(r["f"]).rsplit("/", 1)[-1], []).append([r[c] for c in cols])
    out = {}
    for name, (text, kind) in cases.items():
        recs = records[name]
        if kind == "inside" and (recs[1][0] or "").startswith('"'):  # the opening quote kept: a bad close
            out[name] = (2, 3)
        elif recs[-1][0] == SENTINEL and all(v is None for v in recs[-1][1:]):
            out[name] = None
        else:
            held = [v for rec in recs for v in rec if v and SENTINEL in v]
            assert len(held) == 1, (name, text, recs)
            lines = (text + "Z\n" + SENTINEL).count("\n") + 1
            out[name] = (lines - held[0].count("\n"), None)
    return out


def _check(spark, tmp_path, monkeypatch, seed: int, n_files: int, n_lines: int) -> None:
    from causalrec.ingest import sources

    cases = _cases(seed, n_files, n_lines)
    (tmp_path / "files").mkdir()
    (tmp_path / "sentinel").mkdir()
    for name, (text, _) in cases.items():
        (tmp_path / "files" / name).write_text(text)
    paths = {name: str(tmp_path / "files" / name) for name in cases}
    inside = [paths[n] for n, (_, kind) in cases.items() if kind == "inside"]

    expected = _spark_says(spark, tmp_path / "sentinel", cases)
    got = sources.unclosed_quotes(spark, sorted(paths.values()), read_on=inside)
    wrong = [(n, cases[n][0], expected[n], got.get(paths[n])) for n in sorted(cases)
             if expected[n] != got.get(paths[n])]
    assert not wrong, f"{len(wrong)} of {len(cases)} files disagree with Spark, e.g. {wrong[:5]}"
    assert sum(v is not None for v in expected.values()) > len(cases) // 5  # both verdicts are well represented
    assert sum(v is None for v in expected.values()) > len(cases) // 5

    # the ingest reads the lines of every file that may hold such a field (the others are never checked)
    seen = {}

    def record(spark_, files, *, read_on=(), no_final_break=None):
        seen.update(files=set(files), read_on=set(read_on))
        return {}

    monkeypatch.setattr(sources, "unclosed_quotes", record)
    sources.read_events(spark, str(tmp_path / "files"), "csv")
    missed = [(n, cases[n][0]) for n, e in expected.items()
              if e is not None and paths[n] not in (seen["read_on"] if e[1] is not None else seen["files"])]
    assert not missed, f"never checked: {missed[:5]}"


def test_unclosed_quote_check_agrees_with_spark_on_random_files(spark, tmp_path, monkeypatch):
    _check(spark, tmp_path, monkeypatch, seed=20240607, n_files=240, n_lines=120)


@pytest.mark.slow
def test_unclosed_quote_check_agrees_with_spark_on_many_random_files(spark, tmp_path, monkeypatch):
    _check(spark, tmp_path, monkeypatch, seed=7, n_files=4000, n_lines=2000)


def test_files_without_a_final_line_break_are_found_from_their_last_byte(spark, tmp_path):
    """Those are read again as lines (a quote left open on their last line shows in no record); a
    compressed file's last byte says nothing of its text's, so it is read again too ("unknown")."""
    import gzip

    from causalrec.ingest.sources import _without_final_line_break

    texts = {"lf.csv": "h\na\n", "crlf.csv": "h\r\na\r\n", "cr.csv": "h\ra\r", "none.csv": 'h\na,"b',
             "empty.csv": "", "sp ace[1].csv": "h\na"}
    for name, text in texts.items():
        (tmp_path / name).write_bytes(text.encode())
    (tmp_path / "z.csv.gz").write_bytes(gzip.compress(b"h\na\n"))
    files = [str(tmp_path / n) for n in [*texts, "z.csv.gz"]]
    ending, unknown = _without_final_line_break(spark, files + ["file://" + str(tmp_path / "sp%20ace%5B1%5D.csv")])
    assert ending == {str(tmp_path / "none.csv"), str(tmp_path / "sp ace[1].csv"),
                      "file://" + str(tmp_path / "sp%20ace%5B1%5D.csv")}
    assert unknown == {str(tmp_path / "z.csv.gz")}
