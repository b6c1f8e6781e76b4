"""Prompt lookup: drafts from the longest recent n-gram match, against a brute-force reference."""

from __future__ import annotations

import random

import pytest

from layerstream.coordinator.lookup import PromptLookup


def reference(tokens: list[int], k: int, nmax: int, nmin: int) -> list[int]:
    """The same rule by brute force: for n = nmax..nmin, the latest i < len - n with
    tokens[i - n : i] equal to the last n tokens; the k tokens from i."""
    L = len(tokens)
    for n in range(min(nmax, L), nmin - 1, -1):
        suffix = tokens[L - n :]
        for i in range(L - 1, n - 1, -1):
            if tokens[i - n : i] == suffix:
                return tokens[i : i + k]
    return []


def test_the_longest_suffix_wins_over_a_more_recent_shorter_one():
    # "1 2 3 -> 4" happened once long ago; "3 -> 9" more recently; the sequence ends in 1 2 3
    lk = PromptLookup([1, 2, 3, 4, 5, 6, 3, 9, 7, 1, 2, 3])
    assert lk.propose(3) == [4, 5, 6]
    lk.extend([8])  # now the suffix 3 8 / 8 never occurred: nothing
    assert lk.propose(3) == []


def test_the_most_recent_occurrence_and_a_draft_cut_at_the_end_of_the_text():
    lk = PromptLookup([5, 6, 7, 5, 6, 8, 5, 6])
    assert lk.propose(4) == [8, 5, 6]  # after the latest earlier "5 6": 8 5 6, then the text ends
    assert lk.propose(1) == [8]
    assert lk.propose(0) == []


def test_a_suffix_never_matches_itself():
    assert PromptLookup([1, 2, 3]).propose(2) == []
    assert PromptLookup([4]).propose(2) == []


@pytest.mark.parametrize("seed", range(5))
def test_random_texts_give_the_brute_force_drafts_as_they_grow(seed):
    rng = random.Random(seed)
    toks = [rng.randrange(6) for _ in range(20)]
    lk = PromptLookup(toks, ngram_max=3, ngram_min=1)
    for _ in range(60):
        k = rng.randrange(1, 6)
        assert lk.propose(k) == reference(toks, k, 3, 1)
        new = [rng.randrange(6) for _ in range(rng.randrange(1, 3))]
        toks += new
        lk.extend(new)


def test_bad_ngram_sizes_are_refused():
    with pytest.raises(ValueError, match="n-gram sizes"):
        PromptLookup([1], ngram_max=1, ngram_min=2)
