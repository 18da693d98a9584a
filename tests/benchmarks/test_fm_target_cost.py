"""The target-cost benchmark runs both targets on the same batch and reports each."""

from benchload import load_benchmark

cost = load_benchmark("fm_target_cost.py", "fm_target_cost_under_test")


def test_both_targets_are_timed_and_reported(tmp_path):
    cost.main(["--repeats", "2", "--steps", "2", "--batch-size", "32", "--results",
               str(tmp_path)])
    text = (tmp_path / "fm_target_cost.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| conditional")
            or line.startswith("| averaged")]
    assert len(rows) == 2
    for row in rows:
        median, blocks = row.split("|")[2:4]
        assert float(median) > 0 and len(blocks.split(",")) == 2
    assert "The averaged target adds" in text
