"""Reading users' own tables: each bad-data case gives one clear, located message."""

import gzip

import numpy as np
import pandas as pd
import pytest

from privet.common.data.preprocess import clean
from privet.common.data.tables import (
    DataError,
    check_numeric,
    describe_bad_numbers,
    infer_schema,
    read_folder,
    read_table,
)

MARKERS = ["?", "NA"]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def schema(tables, **overrides):
    settings = dict(label="y", column_types={}, categories={}, classes=[],
                    missing_markers=MARKERS)
    settings.update(overrides)
    return infer_schema(tables, **settings)


def test_reads_cells_as_text_with_source_lines(tmp_path):
    path = write(tmp_path, "d.csv", "age,colour,y\n 39,red,yes\n\n007,blue,no\n")
    table = read_table(path, label="y")
    assert list(table.frame.columns) == ["age", "colour", "y"]
    assert table.frame["age"].tolist() == ["39", "007"]  # text, untouched: no int parsing
    assert table.lines.tolist() == [2, 4]  # the blank line 3 is skipped but still counted
    assert table.skipped_lines == ()
    assert list(table.frame.index) == [0, 1]


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_sniffs_the_delimiter(tmp_path, delimiter):
    rows = [["a", "b", "y"], ["1,5", "x", "yes"], ["2", "z", "no"]]
    text = "".join(delimiter.join(r) + "\n" for r in rows)
    table = read_table(write(tmp_path, "d.txt", text), label="y")
    assert table.frame.values.tolist() == rows[1:]  # "1,5" stays one cell


def test_tsv_and_gzip(tmp_path):
    path = tmp_path / "d.tsv.gz"
    path.write_bytes(gzip.compress(b"a\tb c\ty\n1\tx, z\tyes\n"))
    assert read_table(path, label="y").frame.values.tolist() == [["1", "x, z", "yes"]]


def test_quoted_field_with_a_comma_and_a_newline(tmp_path):
    path = write(tmp_path, "d.csv",
                 'a,note,y\n1, "Smith, J.",yes\n2,"two\nlines",no\n3,"say ""hi""",no\n')
    table = read_table(path, label="y")
    assert table.frame["note"].tolist() == ["Smith, J.", "two\nlines", 'say "hi"']
    assert table.lines.tolist() == [2, 3, 5]  # the second record spans lines 3-4


def test_wrong_field_count_errors_naming_every_bad_line(tmp_path):
    good = "1,2,yes\n"
    path = write(tmp_path, "d.csv", "a,b,y\n" + good * 15 + "1,2,3,yes\n" + good
                 + "1,2\n" + good + "1,2,3,4,yes\n")
    with pytest.raises(DataError) as error:
        read_table(path, label="y")
    message = str(error.value)
    assert message.startswith(f"{path}, line 17: 4 fields, expected 3 (from the header)")
    assert "3 such lines in all: 17, 19, 21" in message and "data.bad-lines" in message
    assert "\n" not in message


def test_wrong_field_count_skipped_and_listed(tmp_path):
    path = write(tmp_path, "d.csv", "a,b,y\n1,2,yes\n1,2,3,yes\n3,4,no\n5\n")
    table = read_table(path, label="y", bad_lines="skip")
    assert table.skipped_lines == (3, 5)
    assert table.frame["a"].tolist() == ["1", "3"] and table.lines.tolist() == [2, 4]


def test_unterminated_quote_names_its_line(tmp_path):
    path = write(tmp_path, "d.csv", 'a,b,y\n1,x,yes\n2,"oops,no\n3,z,yes\n')
    for mode in ("error", "skip"):  # skipping could swallow the rest of the file
        with pytest.raises(DataError, match=r"d\.csv, line 3: a quoted field opens here"):
            read_table(path, label="y", bad_lines=mode)


def test_text_after_a_closing_quote_names_its_line(tmp_path):
    path = write(tmp_path, "d.csv", 'a,b,y\n1,x,yes\n2,"a"b,no\n')
    with pytest.raises(DataError, match=r"d\.csv, line 3: malformed quoting"):
        read_table(path, label="y")


def test_missing_empty_and_header_only_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: no such file; expected a CSV or Parquet "
                                        r"file \(data\.path\)"):
        read_table(tmp_path / "nope.csv", label="y")
    with pytest.raises(DataError, match=r"empty\.csv: no data rows"):
        read_table(write(tmp_path, "empty.csv", ""), label="y")
    with pytest.raises(DataError, match=r"header\.csv: no data rows"):
        read_table(write(tmp_path, "header.csv", "a,b,y\n\n"), label="y")


def test_label_column_missing(tmp_path):
    path = write(tmp_path, "d.csv", "a,b,Income\n1,2,yes\n")
    with pytest.raises(DataError) as error:
        read_table(path, label="income")
    assert str(error.value).startswith(
        f"{path}: label column 'income' not found; columns are: a, b, Income (data.label)")
    assert "did you mean 'Income'?" in str(error.value)
    headerless = write(tmp_path, "h.csv", "39,State-gov,77516,<=50K\n50,Private,83311,>50K\n")
    with pytest.raises(DataError, match="needs a header line"):
        read_table(headerless, label="income")


def test_bad_headers(tmp_path):
    with pytest.raises(DataError, match=r"d\.csv, line 1: duplicate column name\(s\) in the "
                                        r"header: 'a' \(columns 1, 3\)"):
        read_table(write(tmp_path, "d.csv", "a,b,a,y\n1,2,3,yes\n"), label="y")
    with pytest.raises(DataError, match=r"i\.csv, line 1: column 1 of the header has no name"):
        read_table(write(tmp_path, "i.csv", ",a,y\n0,1,yes\n"), label="y")


def test_non_utf8_and_binary_files(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("a,y\n1,yes\n2,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"d\.csv, line 3: not UTF-8 text \(byte 0xe9\)"):
        read_table(path, label="y")
    path.write_bytes(b"PK\x03\x04rest of a workbook")
    with pytest.raises(DataError, match="Excel"):
        read_table(path, label="y")


def test_non_numeric_cells_reported_by_line_and_column_then_missing(tmp_path):
    path = write(tmp_path, "adult.csv",
                 "age,hours,y\n39,40,yes\nabc,40,no\n?,x,no\n 41 ,,yes\n50,1e1,no\n")
    table = read_table(path, label="y")
    bad = check_numeric(table, ["age", "hours"], MARKERS)
    assert bad == {"age": {"non-numeric": [(3, "abc")]}, "hours": {"non-numeric": [(4, "x")]}}
    text = describe_bad_numbers(table, bad)
    assert text.splitlines() == [
        "adult.csv: column 'age': 1 non-numeric value(s), e.g. line 3: 'abc'; treated as missing",
        "adult.csv: column 'hours': 1 non-numeric value(s), e.g. line 4: 'x'; treated as missing"]
    # The same cells are the ones clean() turns into missing values.
    cleaned, report = clean(table.frame, numeric=["age", "hours"], label="y",
                            missing_markers=MARKERS)
    assert report.unparseable_numbers == 2
    assert cleaned["age"].isna().tolist() == [False, True, True, False, False]


def test_infers_types_vocabularies_and_classes(tmp_path):
    rows = [f"{i},{'red' if i % 2 else 'blue'},{i % 3},9{i:04d},{'yes' if i % 2 else 'no'}"
            for i in range(40)]
    rows[5] = "oops,?,1,90005,yes"  # 1 of 40 unparseable: still numeric (>= 95%)
    path = write(tmp_path, "d.csv", "n,colour,code,zip,y\n" + "\n".join(rows) + "\n")
    table = read_table(path, label="y")
    found = schema([table])
    assert found.numeric == ("n", "code", "zip")
    assert found.categories == {"colour": ("blue", "red")}
    assert found.classes == ("no", "yes") and found.label == "y"
    overridden = schema([table], column_types={"code": "categorical", "zip": "ignore"},
                        categories={"colour": ["red", "blue", "green"]})
    assert overridden.numeric == ("n",)
    assert overridden.categories == {"colour": ("red", "blue", "green"),
                                     "code": ("0", "1", "2")}
    assert overridden.ignored == ("zip",)


def test_bad_overrides_name_the_setting_and_column(tmp_path):
    table = read_table(write(tmp_path, "d.csv", "a,b,y\n1,x,yes\n2,z,no\n"), label="y")
    with pytest.raises(DataError, match=r"data\.column-types: column 'c' is not in .*d\.csv"):
        schema([table], column_types={"c": "numeric"})
    with pytest.raises(DataError, match=r"data\.column-types: 'a' = 'text': expected one of "
                                        r"numeric, categorical, ignore"):
        schema([table], column_types={"a": "text"})
    with pytest.raises(DataError, match=r"data\.categories: 'a' has a vocabulary but "
                                        r"data\.column-types makes it numeric"):
        schema([table], column_types={"a": "numeric"}, categories={"a": ["1"]})


def test_too_many_categories_suggests_ignoring(tmp_path):
    rows = "".join(f"id{i},{i % 2}\n" for i in range(30))
    table = read_table(write(tmp_path, "d.csv", "name,y\n" + rows), label="y")
    with pytest.raises(DataError, match=r"column 'name' has 30 distinct values.*"
                                        r"data\.column-types = \{ name = \"ignore\" \}"):
        schema([table], max_vocabulary=10)


def test_label_values_checked_against_classes(tmp_path):
    path = write(tmp_path, "d.csv", "a,y\n1,yes\n2,no\n3, maybe\n4,?\n5,dunno\n")
    table = read_table(path, label="y")
    with pytest.raises(DataError) as error:
        schema([table], classes=["no", "yes"])
    assert str(error.value).startswith(
        f"{path}, line 4: label 'maybe' is not one of ['no', 'yes'] (data.classes)")
    assert "2 such rows" in str(error.value)
    assert schema([table]).classes == ("dunno", "maybe", "no", "yes")  # "?" is missing
    one = read_table(write(tmp_path, "one.csv", "a,y\n1,yes\n2,yes\n"), label="y")
    with pytest.raises(DataError, match=r"one\.csv: label column 'y' has 1 class"):
        schema([one])
    numbers = read_table(write(tmp_path, "n.csv", "a,y\n1,10\n2,2\n3,1\n"), label="y")
    assert schema([numbers]).classes == ("1", "2", "10")


def test_folder_with_one_file_per_client(tmp_path):
    folder = tmp_path / "clients"
    folder.mkdir()
    write(folder, "client10.csv", "a,y\n10,yes\n")
    write(folder, "client2.csv", "y,a\nno,2\n")  # other column order: aligned
    write(folder, "client1.csv", "a,y\n1,no\n")
    write(folder, ".DS_Store", "")
    tables = read_folder(folder, label="y", bad_lines="error")
    assert [t.path.name for t in tables] == ["client1.csv", "client2.csv", "client10.csv"]
    assert [t.frame.values.tolist() for t in tables] == [[["1", "no"]], [["2", "no"]],
                                                         [["10", "yes"]]]
    assert schema(tables).classes == ("no", "yes")
    write(folder, "client3.csv", "a,b,y\n3,x,no\n")
    with pytest.raises(DataError, match=r"client3\.csv: columns differ from client1\.csv: "
                                        r"extra 'b'"):
        read_folder(folder, label="y", bad_lines="error")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty: no CSV or Parquet files"):
        read_folder(empty, label="y", bad_lines="error")
    write(empty, "notes.md", "hi")
    with pytest.raises(DataError, match=r"'notes\.md': not CSV or Parquet files"):
        read_folder(empty, label="y", bad_lines="error")


def test_parquet_round_trip(tmp_path):
    pytest.importorskip("pyarrow")
    frame = pd.DataFrame({"age": [39.0, np.nan, 41.5], "n": pd.array([1, None, 3], "Int64"),
                          "colour": ["red", None, "blue"], "y": ["yes", "no", "yes"]})
    path = tmp_path / "d.parquet"
    frame.to_parquet(path)
    table = read_table(path, label="y")
    assert table.frame.values.tolist() == [["39", "1", "red", "yes"], ["", "", "", "no"],
                                           ["41.5", "3", "blue", "yes"]]
    assert table.lines.tolist() == [1, 2, 3] and table.unit == "row"
    found = schema([table])
    assert found.numeric == ("age", "n") and found.categories == {"colour": ("blue", "red")}
    with pytest.raises(DataError, match=r"d\.parquet: label column 'income' not found"):
        read_table(path, label="income")
    frame.iloc[:0].to_parquet(path)
    with pytest.raises(DataError, match=r"d\.parquet: no data rows"):
        read_table(path, label="y")


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"Parquet needs pyarrow: pip install "
                                        r"'privet\[parquet\]'"):
        read_table(path, label="y")
