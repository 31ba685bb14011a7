import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.core.data import LabelSet, load_labelled, load_pairs, split_indices
from services.core.errors import DataError

ROWS = [("great film", 1), ("awful film", 0), ("fine", 1)]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_each_format(tmp_path, fmt):
    path = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        write(path, "text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in ROWS))
    elif fmt == "tsv":
        write(path, "sentence\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in ROWS))
    elif fmt == "jsonl":
        write(path, "".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in ROWS))
    else:
        pq.write_table(pa.table({"text": [r[0] for r in ROWS], "label": [r[1] for r in ROWS]}),
                       path)
    data = load_labelled(path)
    assert data.texts == [r[0] for r in ROWS]
    assert [int(x) for x in data.labels] == [r[1] for r in ROWS]
    assert len(data.sha256) == 64


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_a_byte_order_mark_is_not_part_of_the_first_name(tmp_path, fmt):
    """Excel and Windows editors save "UTF-8" with a BOM before the header."""
    path = tmp_path / f"excel.{fmt}"
    if fmt == "jsonl":
        body = "".join(json.dumps({"text": t, "label": lab}) + "\r\n" for t, lab in ROWS)
    else:
        sep = "," if fmt == "csv" else "\t"
        body = f"text{sep}label\r\n" + "".join(f"{t}{sep}{lab}\r\n" for t, lab in ROWS)
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    data = load_labelled(path)
    assert data.text_column == "text"
    assert data.texts == [r[0] for r in ROWS]
    assert [int(x) for x in data.labels] == [r[1] for r in ROWS]
    pairs = tmp_path / f"pairs.{fmt}"
    if fmt == "jsonl":
        pairs.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "2+2", "response": "4"}).encode())
    else:
        pairs.write_bytes(b"\xef\xbb\xbf" + f"prompt{sep}response\n2+2{sep}4\n".encode())
    loaded = load_pairs(pairs)
    assert (loaded.prompts, loaded.responses) == (["2+2"], ["4"])


def test_headerless_tsv_with_columns(tmp_path):
    path = write(tmp_path / "ag.tsv", 'Stocks "rally" today\tBusiness\nTeam wins\tSports\n')
    data = load_labelled(path, columns=["text", "label"])
    assert data.texts[0] == 'Stocks "rally" today'
    assert data.labels == ["Business", "Sports"]


def test_headerless_without_columns_names_the_line(tmp_path):
    path = write(tmp_path / "x.tsv", "text\tlabel\nok\t1\nbroken line with\ttoo\tmany\n")
    with pytest.raises(DataError) as err:
        load_labelled(path)
    assert "x.tsv:3" in str(err.value) and "expected 2 fields" in str(err.value)


def test_custom_columns_and_missing_column(tmp_path):
    path = write(tmp_path / "c.csv", "review,stars\nnice,5\nbad,1\n")
    data = load_labelled(path, text_column="review", label_column="stars")
    assert data.labels == ["5", "1"]
    with pytest.raises(DataError, match="no label column 'rating'; columns are: review, stars"):
        load_labelled(path, text_column="review", label_column="rating")
    with pytest.raises(DataError, match="cannot tell which column holds the label"):
        load_labelled(path)
    # the column named for the text is never guessed as the label too
    both = write(tmp_path / "d.csv", "text,label,category\nnice,pos,a\nbad,neg,b\n")
    data = load_labelled(both, text_column="label")
    assert (data.text_column, data.label_column) == ("label", "category")
    with pytest.raises(DataError, match=r"cannot tell which column holds the label \('label' "
                                        r"is the text column\); columns are: text, label"):
        load_labelled(write(tmp_path / "e.csv", "text,label\nnice,pos\n"), text_column="label")
    # a path that is no regular file (a device) is said to be so, not "not found"
    with pytest.raises(DataError, match="/dev/null: not a regular file"):
        load_labelled("/dev/null")


def test_headerless_file_gets_a_hint_to_name_its_columns(tmp_path):
    long = "The US Federal Trade Commission has filed its first spyware case against a man"
    path = write(tmp_path / "news.tsv", f"{long}\tSci/Tech\nLakers win again\tSports\n")
    with pytest.raises(DataError) as err:
        load_labelled(path)
    message = str(err.value)
    assert "cannot tell which column holds the text" in message
    assert "pass --columns text,label" in message and "else pass --text-column" in message
    assert long not in message and long[:37] + "..." in message  # long names cut
    assert load_labelled(path, columns=["text", "label"]).labels == ["Sci/Tech", "Sports"]
    pairs = write(tmp_path / "qa.csv", "what is 2+2?,4\nwhat is 3+3?,6\n")
    with pytest.raises(DataError, match="pass --columns prompt,response"):
        load_pairs(pairs)
    # JSON lines have no header row to mistake: no such hint
    rows = write(tmp_path / "r.jsonl", '{"body": "x", "label": 1}\n')
    with pytest.raises(DataError) as err:
        load_labelled(rows)
    assert "--columns" not in str(err.value)


@pytest.mark.parametrize("body,needle", [
    ("text,label\n,1\n", "c.csv:2: empty text"),
    ("text,label\nhello,\n", "c.csv:2: missing label"),
    ("text,label\n", "no examples"),
])
def test_bad_rows_name_file_and_line(tmp_path, body, needle):
    path = write(tmp_path / "c.csv", body)
    with pytest.raises(DataError, match=needle):
        load_labelled(path)


def test_bad_json_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{oops\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: invalid JSON"):
        load_labelled(path)


def test_not_utf8_and_unknown_suffix_and_missing(tmp_path):
    path = tmp_path / "b.csv"
    path.write_bytes(b"text,label\n\xff\xfe,1\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_labelled(path)
    with pytest.raises(DataError, match="unsupported file type '.xlsx'"):
        load_labelled(write(tmp_path / "d.xlsx", "x"))
    with pytest.raises(DataError, match="not found"):
        load_labelled(tmp_path / "nope.csv")


def test_bad_parquet(tmp_path):
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_labelled(write(tmp_path / "d.parquet", "not parquet"))


def test_labelset_int_and_string_order():
    assert LabelSet.from_labels([10, 2, 2, 1]).names == ["1", "2", "10"]
    ls = LabelSet.from_labels(["b", "a", "b"])
    assert ls.names == ["a", "b"] and ls.encode(["b", "a"]) == [1, 0]
    assert ls.id2label == {0: "a", 1: "b"}
    with pytest.raises(DataError, match="'c' does not occur"):
        ls.encode(["c"])
    with pytest.raises(DataError, match="at least 2 distinct labels"):
        LabelSet.from_labels(["x", "x"])


def test_split_is_deterministic_and_disjoint():
    a = split_indices(100, 0.2, seed=3)
    assert a == split_indices(100, 0.2, seed=3)
    train, ev = a
    assert len(ev) == 20 and not set(train) & set(ev) and len(train) + len(ev) == 100
    assert split_indices(100, 0.2, seed=4) != a


def test_a_folder_a_json_array_and_headers(tmp_path):
    (tmp_path / "d.tsv").mkdir()
    with pytest.raises(DataError, match=r"d.tsv: is a folder; pass a data file"):
        load_labelled(tmp_path / "d.tsv")
    # .json: an array of objects (json.dump of a list) as well as one object per line
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([{"text": t, "label": lab} for t, lab in ROWS], indent=2))
    assert load_labelled(arr).texts == [r[0] for r in ROWS]
    arr.write_text('[{"text": "a", "label": 1}, "oops"]')
    with pytest.raises(DataError, match="item 2 of the array is not a JSON object"):
        load_labelled(arr)
    arr.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    assert load_labelled(arr).texts == ["a", "b"]
    # --columns on a file whose first row names the columns the same way: a header
    both = write(tmp_path / "h.csv", "text,label\ngood,1\nbad,0\n")
    assert load_labelled(both, columns=["text", "label"]).labels == ["1", "0"]
    with pytest.raises(DataError, match=r"h2.csv:1: the header names a column twice: text"):
        load_labelled(write(tmp_path / "h2.csv", "text,text,label\na,b,1\n"))


def test_unknown_eval_labels_are_listed_briefly_with_a_hint_when_swapped():
    texts = [f"a fairly long review sentence number {i} that someone wrote about a film"
             for i in range(150)]
    labels = LabelSet.from_labels(texts)
    with pytest.raises(DataError) as err:
        labels.encode(["positive"], where="dev.tsv: ")
    message = str(err.value)
    assert message.startswith("dev.tsv: label 'positive' does not occur")
    assert "(130 more)" in message and len(message) < 2000
    assert "are the text and label columns swapped?" in message
    with pytest.raises(DataError) as err:
        LabelSet.from_labels(["x", "y"]).encode(["z"])
    assert "swapped" not in str(err.value) and "known labels: x, y)" in str(err.value)
    with pytest.raises(DataError, match="train.csv: need at least 2 distinct labels"):
        LabelSet.from_labels(["1", "1"], where="train.csv: ")


def test_tsv_written_quoted_is_read_quoted_and_glue_style_is_not(tmp_path):
    """pandas' to_csv(sep="\\t") quotes fields holding a tab, a newline or a quote; GLUE
    and SST-2 files are not quoted, and a text there may start with a quote."""
    import csv
    import io

    rows = [("text", "label"), ('he said "hi"\tand left\nlater', "positive"),
            ("plain text", "negative"), ('"quoted" at the start', "positive")]
    out = io.StringIO()
    csv.writer(out, delimiter="\t", lineterminator="\n").writerows(rows)
    quoted = write(tmp_path / "pandas.tsv", out.getvalue())
    data = load_labelled(quoted)
    assert data.texts == [r[0] for r in rows[1:]]
    assert data.labels == ["positive", "negative", "positive"]
    # unquoted: a text that starts with a quote and never closes it, another with
    # quotes inside; both stay as written
    glue = write(tmp_path / "glue.tsv", 'sentence\tlabel\n" a film that never ends\t1\n'
                                        'it is "fine"\t0\nnot "odd\t1\n')
    data = load_labelled(glue)
    assert data.texts == ['" a film that never ends', 'it is "fine"', 'not "odd']
    assert data.labels == ["1", "0", "1"]


def test_json_that_is_not_records_says_what_it_is(tmp_path):
    wrapped = write(tmp_path / "wrapped.json",
                    json.dumps({"data": [{"text": "a", "label": "x"}]}, indent=2))
    with pytest.raises(DataError, match=r"wrapped.json: one JSON object \(its records may be "
                                        r"the list under data\); expected an array"):
        load_labelled(wrapped)
    # pretty-printed objects one after another: neither JSON nor JSON Lines
    pretty = write(tmp_path / "pretty.jsonl", '{\n  "text": "a",\n  "label": "x"\n}\n'
                                              '{\n  "text": "b",\n  "label": "y"\n}\n')
    with pytest.raises(DataError, match=r"pretty.jsonl:1: invalid JSON: .*; JSON Lines holds "
                                        r"each object on one line"):
        load_labelled(pretty)


def test_whole_float_labels_in_text_read_as_integers(tmp_path):
    """pandas writes an integer column holding a NaN as 1.0 / 0.0: the same labels as
    JSON's 1.0, only when every label has that form."""
    floats = write(tmp_path / "f.csv", "text,label\na,1.0\nb,0.0\nc,-2.00\n")
    assert load_labelled(floats).labels == [1, 0, -2]
    assert load_labelled(write(tmp_path / "j.jsonl", '{"text": "a", "label": 1.0}\n')
                         ).labels == [1]
    mixed = write(tmp_path / "m.csv", "text,label\na,1.0\nb,1.5\n")
    assert load_labelled(mixed).labels == ["1.0", "1.5"]


def test_a_header_unlike_columns_is_not_trained_as_a_class(tmp_path):
    path = write(tmp_path / "h.csv", "review,sentiment\ngood,pos\nbad,neg\n")
    with pytest.raises(DataError, match=r"h.csv: its first row \(review, sentiment\) looks "
                                        r"like a header"):
        load_labelled(path, columns=["text", "label"])
    assert load_labelled(path, text_column="review", label_column="sentiment"
                         ).labels == ["pos", "neg"]
    # a first row of data that happens to hold a rare label: kept
    data = write(tmp_path / "d.csv", "fine film,rare\ngood,pos\nbad,pos\n")
    assert load_labelled(data, columns=["text", "label"]).labels == ["rare", "pos", "pos"]
