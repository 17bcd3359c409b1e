"""The benchmarks' own logic: what decides a reported verdict, checked on hand-made inputs."""

from benchmarks import fixed_seed_losses


def _arm(loss, val):
    return {"loss": loss, "val_loss": val, "param_abs_sum": 1.0, "flops": 2.0}


def test_fixed_seed_compare_reports_differing_and_missing_arms():
    before = {"static": _arm([3.0, 2.5, 2.0], 2.1), "set": _arm([3.0, 2.6], 2.2)}
    out = {"static": _arm([3.0, 2.5, 2.0], 2.1),          # identical
           "set": _arm([3.0, 2.7], 2.3),                  # differs from step 1
           "rigl": _arm([3.0], 2.4)}                      # not in the earlier file
    report, ok = fixed_seed_losses.compare(out, before, "before.json")
    assert not ok
    assert report.splitlines() == [
        "DIFFERS set: first differing step 1; fields loss, val_loss; val 2.2 -> 2.3",
        "MISSING rigl: not in before.json, nothing to compare it with",
        "1 identical, 1 differ, 1 missing from the comparison",
    ]
    # An arm missing alone also fails: nothing shows it unchanged.
    assert not fixed_seed_losses.compare({"rigl": _arm([3.0], 2.4)}, before)[1]
    # Arms this run skipped are listed but do not fail it.
    assert fixed_seed_losses.compare({"static": before["static"]}, before) == (
        "not run (in the earlier file only): set\n"
        "1 identical, 0 differ, 0 missing from the comparison", True)
    # Equal losses, another field changed; and NaN losses (a diverged run) equal themselves.
    moved = dict(before["static"], param_abs_sum=1.5)
    report, ok = fixed_seed_losses.compare({"static": moved}, {"static": before["static"]})
    assert not ok and report.splitlines()[0] == (
        "DIFFERS static: losses equal; fields param_abs_sum; val 2.1 -> 2.1")
    nan = {"static": _arm([3.0, float("nan")], float("nan"))}
    assert fixed_seed_losses.compare(nan, {"static": _arm([3.0, float("nan")], float("nan"))})[1]
