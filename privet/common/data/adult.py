"""UCI Adult, shipped with privet (see common/data/adult/README.md for attribution).

The schema below is the dataset's published one (`adult.names`). Clients take their
categorical vocabularies from it, never from other clients' rows.
"""

from __future__ import annotations

import functools
import json
import os
from importlib import metadata
from pathlib import Path

import pandas as pd

NUMERIC = ["age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week"]
CATEGORIES: dict[str, list[str]] = {
    "workclass": ["Private", "Self-emp-not-inc", "Self-emp-inc", "Federal-gov", "Local-gov",
                  "State-gov", "Without-pay", "Never-worked"],
    "education": ["Bachelors", "Some-college", "11th", "HS-grad", "Prof-school", "Assoc-acdm",
                  "Assoc-voc", "9th", "7th-8th", "12th", "Masters", "1st-4th", "10th",
                  "Doctorate", "5th-6th", "Preschool"],
    "marital-status": ["Married-civ-spouse", "Divorced", "Never-married", "Separated",
                       "Widowed", "Married-spouse-absent", "Married-AF-spouse"],
    "occupation": ["Tech-support", "Craft-repair", "Other-service", "Sales", "Exec-managerial",
                   "Prof-specialty", "Handlers-cleaners", "Machine-op-inspct", "Adm-clerical",
                   "Farming-fishing", "Transport-moving", "Priv-house-serv", "Protective-serv",
                   "Armed-Forces"],
    "relationship": ["Wife", "Own-child", "Husband", "Not-in-family", "Other-relative",
                     "Unmarried"],
    "race": ["White", "Asian-Pac-Islander", "Amer-Indian-Eskimo", "Other", "Black"],
    "sex": ["Female", "Male"],
    "native-country": ["United-States", "Cambodia", "England", "Puerto-Rico", "Canada",
                       "Germany", "Outlying-US(Guam-USVI-etc)", "India", "Japan", "Greece",
                       "South", "China", "Cuba", "Iran", "Honduras", "Philippines", "Italy",
                       "Poland", "Jamaica", "Vietnam", "Mexico", "Portugal", "Ireland",
                       "France", "Dominican-Republic", "Laos", "Ecuador", "Taiwan", "Haiti",
                       "Columbia", "Hungary", "Guatemala", "Nicaragua", "Scotland",
                       "Thailand", "Yugoslavia", "El-Salvador", "Trinadad&Tobago", "Peru",
                       "Hong", "Holand-Netherlands"],
}
# Public ranges of the numeric columns, from the census coding (capital gains are top-coded
# at 99,999); federated preprocessing clips to them. Not derived from the rows.
BOUNDS = {"age": (16.0, 100.0), "fnlwgt": (0.0, 1_500_000.0), "education-num": (1.0, 16.0),
          "capital-gain": (0.0, 99_999.0), "capital-loss": (0.0, 5_000.0),
          "hours-per-week": (0.0, 100.0)}
LABEL = "income"
CLASSES = ["<=50K", ">50K"]
MISSING_MARKERS = ["?"]
COLUMNS = ["age", "workclass", "fnlwgt", "education", "education-num", "marital-status",
           "occupation", "relationship", "race", "sex", "capital-gain", "capital-loss",
           "hours-per-week", "native-country", LABEL]
FILES = {"train": "adult.data.gz", "test": "adult.test.gz"}


def _candidate_dirs() -> list[Path]:
    """Where the shipped files may be: next to this module, or in the installed project.

    A Flower App bundle (FAB) carries only source files, so a ClientApp running from an
    unpacked FAB falls back to the privet installation it runs in.
    """
    dirs = [Path(__file__).resolve().parent / "adult"]
    if os.environ.get("PRIVET_ADULT_DIR"):
        dirs.insert(0, Path(os.environ["PRIVET_ADULT_DIR"]))
    try:
        dist = metadata.distribution("privet")
    except metadata.PackageNotFoundError:
        return dirs
    direct_url = dist.read_text("direct_url.json")
    if direct_url:  # editable or local install: the project checkout
        url = json.loads(direct_url).get("url", "")
        if url.startswith("file://"):
            dirs.append(Path(url[len("file://"):]) / "privet" / "common" / "data" / "adult")
    dirs.append(Path(str(dist.locate_file("privet/common/data/adult"))))
    return dirs


def data_file(split: str) -> Path:
    """Path of the Adult `split` ("train" or "test"); a clear error if it is missing."""
    name = FILES[split]
    dirs = _candidate_dirs()
    for d in dirs:
        if (d / name).is_file():
            return d / name
    looked = ", ".join(str(d) for d in dirs)
    raise FileNotFoundError(
        f"Adult file {name} not found; looked in: {looked}. It ships with privet: "
        "install the project (`pip install -e .`) or set PRIVET_ADULT_DIR to a folder "
        f"holding {FILES['train']} and {FILES['test']}.")


@functools.lru_cache(maxsize=2)
def load_raw(split: str) -> pd.DataFrame:
    """The file's rows as strings, untouched: cleaning is each client's own job."""
    path = data_file(split)
    frame = pd.read_csv(path, header=None, names=COLUMNS, dtype=str, keep_default_na=False,
                        skiprows=1 if split == "test" else 0, skip_blank_lines=True)
    if frame.shape[1] != len(COLUMNS):
        raise ValueError(f"{path}: expected {len(COLUMNS)} columns, found {frame.shape[1]}")
    return frame


def normalise_label(value: str) -> str:
    """The test file writes labels with a trailing dot (">50K."): privet's one label
    normalisation (common.data.tables.normalise_label) drops it."""
    from privet.common.data.tables import normalise_label as normalise

    return normalise(value)
