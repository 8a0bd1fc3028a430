"""Batch orders: deterministic, shuffled, length-grouped; padding share."""

from __future__ import annotations

import random

import pytest

from instructune.data.sampling import batch_order, padding_share


def lengths(n=1000, seed=0):
    rng = random.Random(seed)
    return [rng.randint(20, 400) for _ in range(n)]


def test_plain_order_and_drop_last():
    assert batch_order([1] * 7, 3, seed=0, shuffle=False) == [[0, 1, 2], [3, 4, 5]]
    assert batch_order([1] * 7, 3, seed=0, shuffle=False, drop_last=False) == [
        [0, 1, 2],
        [3, 4, 5],
        [6],
    ]
    assert batch_order([1] * 6, 3, seed=0, shuffle=False) == [[0, 1, 2], [3, 4, 5]]
    assert batch_order([], 3, seed=0) == []
    with pytest.raises(ValueError):
        batch_order([1], 0, seed=0)


@pytest.mark.parametrize("grouped", [False, True])
def test_deterministic_for_seed_and_epoch_and_a_permutation(grouped):
    ls = lengths()
    a = batch_order(ls, 8, seed=1, epoch=2, group_by_length=grouped)
    assert a == batch_order(ls, 8, seed=1, epoch=2, group_by_length=grouped)
    assert a != batch_order(ls, 8, seed=1, epoch=3, group_by_length=grouped)
    assert a != batch_order(ls, 8, seed=2, epoch=2, group_by_length=grouped)
    assert all(len(b) == 8 for b in a) and len(a) == 125
    flat = [i for b in a for i in b]
    assert sorted(flat) == list(range(1000))


def test_unaffected_by_global_random_state():
    ls = lengths()
    random.seed(1)
    a = batch_order(ls, 8, seed=5)
    random.seed(2)
    assert a == batch_order(ls, 8, seed=5)


def test_length_grouping_cuts_padding_and_stays_shuffled():
    ls = lengths()
    plain = batch_order(ls, 8, seed=0)
    grouped = batch_order(ls, 8, seed=0, group_by_length=True)
    assert padding_share(ls, grouped) < padding_share(ls, plain) / 4
    # Batches are not in length order: the order across batches is still random.
    maxima = [max(ls[i] for i in b) for b in grouped]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)
    # Unshuffled grouping is sorted within each window.
    ordered = batch_order(ls, 8, seed=0, shuffle=False, group_by_length=True)
    window = [ls[i] for b in ordered[:50] for i in b]
    assert window == sorted(window)


def test_padding_share():
    assert padding_share([2, 4], [[0, 1]]) == pytest.approx(0.25)
    assert padding_share([3, 3, 3], [[0, 1], [2]]) == 0.0
    assert padding_share([], []) == 0.0
