"""The demo's claim check: each claim carries its measured numbers and can fail."""

from datasetdm_jax import demo


def _result(real, mixed, real_shift, mixed_shift, rel_real, rel_mixed):
    sem = {"real": {"test": {"miou": real}, "test_shifted": {"miou": real_shift}},
           "real+synthetic": {"test": {"miou": mixed}, "test_shifted": {"miou": mixed_shift}}}
    dep = {"real": {"test": {"rel": rel_real}}, "real+synthetic": {"test": {"rel": rel_mixed}}}
    return {"semantic": sem, "depth": dep}


def test_claims_hold_when_synthetic_data_helps():
    claims = demo.check_claims(_result(0.40, 0.47, 0.30, 0.40, 0.20, 0.15), min_gain=5.0)
    assert [c["holds"] for c in claims] == [True, True, True]
    assert abs(claims[0]["measured"] - 7.0) < 1e-6


def test_claims_fail_when_it_does_not():
    claims = demo.check_claims(_result(0.40, 0.42, 0.30, 0.31, 0.20, 0.25), min_gain=5.0)
    assert [c["holds"] for c in claims] == [False, False, False]
