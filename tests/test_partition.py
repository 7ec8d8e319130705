import numpy as np
import pytest

from privet.common.data import adult
from privet.common.data.partition import (
    KINDS,
    MISSING,
    dirichlet,
    iid,
    natural_groups,
    partition,
    quantity_sizes,
)

LABELS = np.repeat(np.arange(10), 100)  # balanced 10-class toy, 1000 rows
COUNTRY = np.array(["us"] * 500 + ["mx"] * 200 + ["ph"] * 120 + ["de"] * 80 + ["ca"] * 60
                   + ["in"] * 40)


def split(kind, labels=LABELS, num_clients=5, seed=0, min_rows=1, **kw):
    if kind == "natural":
        kw.setdefault("groups", COUNTRY[:len(labels)])
    return partition(kind, labels, num_clients, seed=seed, min_rows=min_rows, **kw)


def assert_every_row_once(parts, num_rows):
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(num_rows))
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)  # sorted


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_assigns_every_row_once_and_is_deterministic(kind):
    for num_clients in (1, 3, 5):
        assert_every_row_once(split(kind, num_clients=num_clients), len(LABELS))
    same = zip(split(kind, seed=3), split(kind, seed=3))
    assert all(np.array_equal(a, b) for a, b in same)
    differs = any(not np.array_equal(a, b) for a, b in zip(split(kind, seed=3),
                                                           split(kind, seed=4)))
    assert differs == (kind != "natural")  # natural is a function of the column alone


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_enforces_min_rows(kind):
    assert min(len(p) for p in split(kind, min_rows=40)) >= 40
    with pytest.raises(ValueError, match="data.min-rows = 201"):
        split(kind, min_rows=201)  # 5 x 201 > 1000 rows


def test_iid_and_dirichlet_assign_every_row_once_and_are_deterministic():
    labels = np.array(["a"] * 700 + ["b"] * 300)
    for parts in (iid(1000, 7, seed=1), dirichlet(labels, 7, 0.5, seed=1, min_rows=20)):
        joined = np.concatenate(parts)
        assert sorted(joined.tolist()) == list(range(1000))
    assert all((a == b).all() for a, b in zip(dirichlet(labels, 7, 0.5, 3, 20),
                                              dirichlet(labels, 7, 0.5, 3, 20)))
    assert min(len(p) for p in dirichlet(labels, 7, 0.5, 3, min_rows=50)) >= 50
    with pytest.raises(ValueError, match="data.min-rows"):
        iid(100, 7, seed=1, min_rows=15)  # 100 // 7 = 14


def test_dirichlet_alpha_controls_label_skew():
    labels = np.array(["a"] * 5000 + ["b"] * 5000)

    def spread(alpha):
        parts = dirichlet(labels, 10, alpha, seed=0, min_rows=1)
        return np.std([np.mean(labels[p] == "a") for p in parts])

    assert spread(0.1) > spread(1.0) > spread(100.0)
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet(labels[:10], 5, 0.5, seed=0, min_rows=5)


def test_shards_give_each_client_about_k_classes():
    for k in (1, 2, 5):  # shards line up with classes: exactly ≤ k labels each
        parts = split("shards", num_clients=10, shards_per_client=k)
        assert all(len(np.unique(LABELS[p])) <= k for p in parts)
    parts = split("shards", num_clients=7, shards_per_client=2)  # shards straddle classes
    assert_every_row_once(parts, len(LABELS))
    distinct = [len(np.unique(LABELS[p])) for p in parts]
    assert max(distinct) <= 2 * 2 and np.mean(distinct) <= 2 + 1
    # string labels and a row count that does not divide: the leftover rows are placed
    words = np.array(["cat", "dog", "eel"])[np.arange(1001) % 3]
    assert_every_row_once(split("shards", labels=words, num_clients=4, shards_per_client=3),
                          1001)


def test_shards_reject_more_shards_than_rows():
    with pytest.raises(ValueError, match="data.shards-per-client = 5"):
        split("shards", labels=LABELS[:40], num_clients=10, shards_per_client=5)


def test_quantity_sizes_follow_the_power_law():
    for power in (0.5, 1.0, 2.0):
        sizes = quantity_sizes(1000, 10, power)
        assert sizes.sum() == 1000 and np.all(np.diff(sizes) < 0)
    assert np.ptp(quantity_sizes(1000, 7, 0.0)) <= 1
    ratios = [(s.max() / s.min()) for s in (quantity_sizes(1000, 10, p) for p in (0, 1, 2))]
    assert ratios[0] < ratios[1] < ratios[2]
    assert quantity_sizes(1000, 10, 2.0, min_rows=50).min() >= 50  # min_rows first
    # the clients get those sizes, in a seeded order of ranks
    sizes = [len(p) for p in split("quantity", num_clients=10, power=1.0)]
    assert sorted(sizes, reverse=True) == quantity_sizes(1000, 10, 1.0).tolist()
    with pytest.raises(ValueError, match="data.power"):
        quantity_sizes(1000, 10, -1.0)


def test_natural_one_client_per_value_when_counts_match():
    parts = split("natural", num_clients=6)
    assert [len(p) for p in parts] == [500, 200, 120, 80, 60, 40]  # by count, descending
    assert natural_groups(COUNTRY, 6) == [["us"], ["mx"], ["ph"], ["de"], ["ca"], ["in"]]
    assert [set(COUNTRY[p]) for p in parts] == [{"us"}, {"mx"}, {"ph"}, {"de"}, {"ca"}, {"in"}]
    tie = np.array(["b", "a", "b", "a"])  # equal counts: ordered by name
    assert natural_groups(tie, 2) == [["a"], ["b"]]


def test_natural_groups_values_when_more_values_than_clients():
    groups = natural_groups(COUNTRY, 3)  # greedy: largest value into the smallest client
    assert groups == [["us"], ["mx", "ca"], ["ph", "de", "in"]]
    parts = split("natural", num_clients=3)
    assert [len(p) for p in parts] == [500, 260, 240]
    assert [set(COUNTRY[p]) for p in parts] == [set(g) for g in groups]


def test_natural_rejects_fewer_values_than_clients_and_small_groups():
    with pytest.raises(ValueError, match="data.natural-column has only 6 distinct values"):
        split("natural", num_clients=7)
    with pytest.raises(ValueError,
                       match=r"data.min-rows = 50: natural client 5 \(in\) has only 40 rows"):
        split("natural", num_clients=6, min_rows=50)
    with pytest.raises(ValueError, match="data.natural-column"):
        split("natural", groups=None)


def test_natural_puts_missing_values_in_one_group():
    groups = np.array(["a", None, "b", np.nan, "", "  ", "a ", float("nan")], dtype=object)
    parts = partition("natural", np.zeros(8), 3, seed=0, min_rows=1, groups=groups)
    assert natural_groups(groups, 3) == [[MISSING], ["a"], ["b"]]
    assert [p.tolist() for p in parts] == [[1, 3, 4, 5, 7], [0, 6], [2]]


def test_natural_on_adults_native_country():
    raw = adult.load_raw("train")
    labels, countries = raw[adult.LABEL].to_numpy(), raw["native-country"].to_numpy()
    parts = partition("natural", labels, 10, seed=0, min_rows=64, groups=countries)
    assert_every_row_once(parts, len(raw))
    groups = natural_groups(countries, 10)
    assert groups[0] == ["United-States"] and sum(len(g) for g in groups) == 42
    stripped = np.char.strip(countries.astype(str))  # the raw file pads values with a space
    assert [len(p) for p in parts] == [int(np.isin(stripped, g).sum()) for g in groups]


def test_unknown_kind():
    with pytest.raises(ValueError, match="data.partition = 'random'"):
        split("random")
