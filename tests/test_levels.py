import pytest

from spdy.levels import DENSE, Option, geometric_levels, options_for, spdy_grid


def test_default_grid_is_the_papers():
    grid = spdy_grid()
    assert len(grid) == 42 and grid[0] == 0.0
    assert grid[1:5] == [0.4, 0.4584, 0.5111, 0.5586]
    assert grid[-2:] == [0.9889, 0.99]
    # each step removes the same fraction of the remaining weights
    expected = [round(1 - 0.6 * (0.01 / 0.6) ** (k / 40), 4) for k in range(41)]
    assert grid[1:] == expected


def test_configurable_grid():
    levels = geometric_levels(0.5, 0.9, 5)
    assert levels[0] == 0.5 and levels[-1] == 0.9 and len(levels) == 5
    with pytest.raises(ValueError, match="min_sparsity"):
        geometric_levels(0.9, 0.5)


@pytest.mark.parametrize("key, sparsity, pattern", [
    ("0.0000", 0.0, "unstructured"), ("0.9000", 0.9, "unstructured"),
    ("4x1@0.9000", 0.9, "4x1"), ("2:4@0.5000", 0.5, "2:4"), ("16x16@0.7354", 0.7354, "16x16"),
])
def test_option_keys_round_trip(key, sparsity, pattern):
    option = Option.parse(key)
    assert (option.sparsity, option.pattern) == (sparsity, pattern)
    assert option.key == key


def test_dense_is_shared_by_all_patterns():
    assert Option(0.0, "4x1").key == DENSE
    assert options_for("2:4") == [Option(0.0), Option(0.5, "2:4")]
    assert options_for("4x1", [0.5, 0.9])[1].key == "4x1@0.5000"


@pytest.mark.parametrize("bad", ["", "abc", "0.9x", "4x@0.5", "3:2@0.5", "1.5"])
def test_bad_keys_name_the_key(bad):
    with pytest.raises(ValueError, match="0.9000|pattern|sparsity"):
        Option.parse(bad)
