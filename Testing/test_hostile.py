"""Reliability: generated hostile cards, model files, arrays, parameters and command lines (``Testing/hostile.py``).

Every case runs in a child process, so that a crash counts as one; each must end in an IBIX error naming the
field or argument, or in a finite, in-range result that agrees with brute force where there is an oracle; no
input (array, card, file) may change. The per-category tally is printed for the README's Reliability section.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import hostile  # noqa: E402

SEED = 17
#: Cases each category must hold at least.
MINIMUM = {"cards": 1000, "models": 200, "arrays": 250, "commands": 60}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """The categories, run side by side (each in its own child processes)."""
    with ThreadPoolExecutor(2) as pool:  # two cores in CI
        futures = {c: pool.submit(hostile.run_category, c, SEED, tmp_path_factory.mktemp(c)) for c in MINIMUM}
        return {c: f.result() for c, f in futures.items()}


@pytest.mark.parametrize("category", sorted(MINIMUM))
def test_hostile_inputs_give_clean_errors_or_correct_results(reports, category, capsys):
    report = reports[category]
    tally = report["tally"]
    with capsys.disabled():
        print(f"\n[hostile] {hostile.tally_line(category, tally)}")
    assert tally["tried"] >= MINIMUM[category]
    problems = "\n".join(f"#{p['index']} {p['outcome']} ({p['kind']}): {p['detail']}"
                         + (" [input changed]" if p["changed"] else "") for p in report["problems"])
    assert not report["problems"], f"{len(report['problems'])} problem(s):\n{problems}"


@pytest.mark.parametrize("category, kinds", [
    ("cards", ["mutated card via validate_card", "mutated card via load_model", "card of another type",
               "self-referencing card", "card file: nested 100000 deep", "card file: 5000-digit number",
               "card file: 1e400", "card file: huge file", "mutated card file"]),
    ("models", ["truncated", "random bytes", "byte-flipped", "wrong input rank", "classifier or wrong output rank",
                "NaN above a threshold", "Log(x)", "two inputs", "integer, boolean or text input",
                "huge or odd declared dimensions", "batch-mixing: x - mean over N (batch statistics)", "fixed batch 3",
                "unknown operator", "autoencoder", "model path: link loop"]),
    ("arrays", ["input: string array", "input: object array", "mask: string mask", "mask: object mask",
                "n_jitters=1000000000000.0", "n_jitters=9223372036854775808", "channels=1.0", "compactness='x'",
                "locality_tolerance='0'", "cancel=True", "cancel='x'", "cancel=0", "progress=5", "geometry='x'",
                "max_jitter=1e-40", "blocks: 2**31 labels", "2D mask for a 3D input"]),
    ("commands", ["command: 2D mask for a 3D input", "command: --max-jitter '1e-40'", "command: garbage model",
                  "command: block labels of 2**31 and more", "command: batch-mixing model", "command: mask far away"]),
])
def test_every_category_of_the_issue_is_generated(reports, category, kinds):
    generated = {r["kind"] for r in reports[category]["results"].values()}
    assert set(kinds) <= generated, sorted(set(kinds) - generated)


def test_the_runner_tells_every_outcome_apart(tmp_path):
    """Known outcomes, a crash (abort) and a hang included: the runner goes on after each. The hang is found by a
    case time limit that only a hang reaches (the other cases take microseconds; a child's start-up, which a loaded
    machine can slow down to seconds, does not count against it)."""
    report = hostile.run_category("selftest", SEED, tmp_path, case_timeout=10.0)
    outcomes = {r["kind"]: (r["outcome"], r["changed"]) for r in report["results"].values()}
    assert outcomes == {
        "clean": ("clean", False), "accepted": ("accepted", False),
        "raw: error naming nothing": ("raw", False), "raw: library error": ("raw", False),
        "raw: non-finite result": ("raw", False), "raw: type error outside IBIX": ("raw", False),
        "crash": ("crash", False), "accepted after a crash": ("accepted", False), "crash: hang": ("crash", False),
        "changed input": ("accepted", True), "accepted despite printing": ("accepted", False),
        "accepted at the end": ("accepted", False)}
    assert report["tally"] == {"clean": 1, "accepted": 5, "raw": 4, "crash": 2, "tried": 12, "changed": 1}
