"""The paired test of the promotion gate on counts worked out by hand, and the gate's rules on them.

p-values: with m = b + c discordant photos, p = min(1, 2 · sum_{i <= min(b, c)} C(m, i) / 2^m):

    b=1,  c=0:  2 · 1/2                          = 1.0
    b=6,  c=0:  2 · 1/64                         = 0.03125
    b=10, c=2:  2 · (1 + 12 + 66)/4096           = 0.03857421875
    b=20, c=6:  2 · 313912/2^26                  = 0.0093553066...
    b=13, c=12: the one-photo gain of the demo's 27 photos: p = 1.0

Clopper–Pearson references: x=0 of n has the closed-form upper bound 1 − (α/2)^(1/n); 10 of 12 at
95 % is [0.51586, 0.97914] (R's binom.test).
"""

from __future__ import annotations

import itertools

import pytest

from shopvision.components.registry.promotion_gate import Score, compare, decide, training_refusal
from shopvision.components.registry.significance import (
    binomial_cdf,
    clopper_pearson,
    mcnemar_p_value,
    paired_comparison,
)


@pytest.mark.parametrize(
    ("b", "c", "p"),
    [
        (1, 0, 1.0),
        (0, 1, 1.0),
        (6, 0, 0.03125),
        (10, 2, 79 / 2048),
        (2, 10, 79 / 2048),
        (20, 6, 2 * 313912 / 2**26),
        (13, 12, 1.0),
        (5, 5, 1.0),
        (0, 0, 1.0),
    ],
)
def test_exact_mcnemar_p_values(b, c, p):
    assert mcnemar_p_value(b, c) == pytest.approx(p, rel=1e-12)


def test_binomial_cdf_matches_the_exact_sum():
    from math import comb

    for n, k in [(12, 2), (26, 6), (40, 19), (5, 0)]:
        exact = sum(comb(n, i) for i in range(k + 1)) / 2**n
        assert binomial_cdf(k, n, 0.5) == pytest.approx(exact, rel=1e-10)
    assert binomial_cdf(3, 10, 0.2) == pytest.approx(0.8791261184, rel=1e-9)  # 1 − P(X >= 4)


def test_clopper_pearson_bounds():
    low, high = clopper_pearson(0, 5, 0.95)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 5), abs=1e-9)
    low, high = clopper_pearson(5, 5, 0.95)
    assert low == pytest.approx(0.025 ** (1 / 5), abs=1e-9) and high == 1.0
    low, high = clopper_pearson(10, 12, 0.95)
    assert low == pytest.approx(0.5158623, abs=1e-6) and high == pytest.approx(0.9791375, abs=1e-6)


def test_the_interval_of_the_difference_agrees_with_the_test():
    """The interval excludes 0 exactly when p < alpha, on every split of up to 24 discordant photos."""
    for alpha in (0.05, 0.01):
        for b, c in itertools.product(range(25), repeat=2):
            if b + c > 24:
                continue
            paired = paired_comparison(b, c, 40, alpha)
            excludes_zero = paired.ci_low > 0 or paired.ci_high < 0
            assert excludes_zero == paired.significant, (alpha, b, c, paired)
            assert paired.ci_low <= paired.difference <= paired.ci_high


def test_the_interval_matches_scipy_when_installed():
    stats = pytest.importorskip("scipy.stats")
    for b, c, n in [(10, 2, 28), (20, 6, 28), (1, 0, 27), (3, 9, 50)]:
        paired = paired_comparison(b, c, n, 0.05)
        ci = stats.binomtest(b, b + c).proportion_ci(0.95, method="exact")
        m = b + c
        assert paired.ci_low == pytest.approx(m / n * (2 * ci.low - 1), abs=1e-7)
        assert paired.ci_high == pytest.approx(m / n * (2 * ci.high - 1), abs=1e-7)
        assert paired.p_value == pytest.approx(stats.binomtest(b, m).pvalue, rel=1e-9)


def test_bad_counts_are_refused():
    with pytest.raises(ValueError):
        paired_comparison(3, 2, 4)
    with pytest.raises(ValueError):
        paired_comparison(1, 0, 10, alpha=1.0)


# ------------------------------------------------------------------------ the gate on per-photo scores


def scores(both: int, candidate_only: int, champion_only: int, neither: int) -> tuple[Score, Score]:
    """A candidate and a champion scored on the same photos, with the given agreement counts."""
    kinds = [(True, True)] * both + [(True, False)] * candidate_only
    kinds += [(False, True)] * champion_only + [(False, False)] * neither
    photos = [f"{i:064x}" for i in range(len(kinds))]
    candidate = Score.of({h: k[0] for h, k in zip(photos, kinds, strict=True)})
    champion = Score.of({h: k[1] for h, k in zip(photos, kinds, strict=True)})
    return candidate, champion


def test_discordant_counts_come_from_the_same_photos():
    candidate, champion = scores(both=5, candidate_only=10, champion_only=2, neither=11)
    paired = compare(candidate, champion)
    assert (paired.candidate_only, paired.champion_only, paired.photos) == (10, 2, 28)
    assert paired.p_value == pytest.approx(79 / 2048)
    with pytest.raises(ValueError):
        compare(candidate, champion.restricted(list(champion.right)[:-1]))


def test_significance_decides_between_a_real_and_a_chance_gain():
    promoted, why = decide(*scores(5, 10, 2, 11))
    assert promoted and "p = 0.0386" in why
    promoted, why = decide(*scores(5, 10, 2, 11), alpha=0.01)
    assert not promoted and "not significant" in why and "p = 0.0386" in why
    promoted, why = decide(*scores(5, 6, 0, 17))
    assert promoted and "p = 0.0312" in why
    # The demo's case: 27 photos, the candidate right on one photo more: better, but by chance.
    candidate, champion = scores(both=0, candidate_only=13, champion_only=12, neither=2)
    assert candidate.correct == champion.correct + 1
    promoted, why = decide(candidate, champion)
    assert not promoted and "not significant" in why and "p = 1.0000" in why
    promoted, why = decide(*scores(10, 1, 0, 16))
    assert not promoted and "not significant" in why


def test_ties_floors_and_the_margin():
    promoted, why = decide(*scores(10, 3, 3, 4))
    assert not promoted and "ties" in why  # equal counts are never promoted, whatever the p-value
    promoted, why = decide(*scores(10, 0, 0, 4))
    assert not promoted and "ties" in why
    promoted, why = decide(*scores(10, 2, 6, 2))
    assert not promoted and "is below" in why
    candidate, champion = scores(5, 20, 0, 5)  # 25/30 vs 5/30, p ~ 2e-6
    assert decide(candidate, champion)[0]
    promoted, why = decide(candidate, champion, min_accuracy=0.9)
    assert not promoted and "below the floor" in why  # the floor comes first
    promoted, why = decide(candidate, champion, min_gain=0.7)
    assert not promoted and "less than the minimum gain" in why
    assert decide(candidate, champion, min_gain=20 / 30)[0]  # exactly the margin, despite rounding
    # No champion: only the floor applies, however few photos.
    alone = Score.of({"a" * 64: True, "b" * 64: False})
    assert decide(alone, None)[0]
    assert decide(alone, None, min_accuracy=0.5)[0]
    promoted, why = decide(alone, None, min_accuracy=0.6)
    assert not promoted and "below the floor" in why


def test_unloadable_champions_and_refusals_in_gate_order():
    candidate, champion = scores(5, 20, 0, 5)
    promoted, why = decide(candidate, None, champion_error="bad weights")
    assert not promoted and "--force" in why
    assert decide(candidate, None, champion_error="bad weights", force=True)[0]
    promoted, why = decide(candidate, None, champion_error="bad", force=True, min_accuracy=0.9)
    assert not promoted and "floor" in why
    promoted, why = decide(candidate, champion, refusal="the candidate v2 trained on 3 photos")
    assert not promoted and why == "the candidate v2 trained on 3 photos"
    promoted, why = decide(candidate, None, champion_error="bad", force=True, refusal="trained on it")
    assert not promoted and why == "trained on it"  # --force never gets a leaky candidate through
    assert "floor" in decide(candidate, champion, refusal="x", min_accuracy=0.95)[1]


def test_training_overlap_is_checked_by_hash_prefix():
    frozen = [f"{i:02x}" + "0" * 62 for i in range(10)]
    clean = {"ff" + "0" * 14}
    leaky = {frozen[3][:16], frozen[7][:16], "ee" + "0" * 14}
    assert training_refusal(frozen, {"2": clean, "1": clean}, "2", "1") == (None, [])
    why, _ = training_refusal(frozen, {"2": leaky, "1": clean}, "2", "1")
    assert "candidate v2 trained on 2 of the 10 photos" in why
    why, _ = training_refusal(frozen, {"2": leaky, "1": clean}, "2", "1", force=True)
    assert "candidate v2 trained on 2" in why  # force does not excuse the candidate
    why, _ = training_refusal(frozen, {"2": clean, "1": leaky}, "2", "1")
    assert "champion v1 trained on 2" in why and "--force" in why
    why, notes = training_refusal(frozen, {"2": clean, "1": leaky}, "2", "1", force=True)
    assert why is None and "inflated" in notes[0]
    why, _ = training_refusal(frozen, {"2": None, "1": clean}, "2", "1")
    assert "candidate v2's training photos are unknown" in why and "--allow-unknown-training-data" in why
    why, notes = training_refusal(frozen, {"2": None, "1": None}, "2", "1", allow_unknown=True)
    assert why is None and len(notes) == 2 and "NOT checked" in notes[0]
    # An unloadable champion is not compared, so its training photos do not matter.
    assert training_refusal(frozen, {"2": clean, "1": leaky}, "2", None) == (None, [])
