"""``diffloss-fast check-precision`` on the tiny prior: one table row per comparison, the
difference path inside the bounds, the two-pass path beside it on request, and its JSON."""
import json

from diffloss_fast.cli import main
from diffloss_fast.tools import precision


def test_check_precision_on_the_tiny_prior(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(precision, "DELTAS", (0.01,))
    monkeypatch.setattr(precision, "TIMESTEPS", (950,))
    out = tmp_path / "precision.json"
    main(["check-precision", "--device", "cpu", "--prior", "tiny", "--resolution", "32",
          "--batch", "1", "--precisions", "bf16", "--two-pass", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 * 2  # three term sets, difference and two-pass
    mine = [r for r in rows if r["propagation"] == "difference"]
    assert {r["term"] for r in mine} == {"natural", "semantic", "both"}
    assert all(r["ok"] and r["rel_error"] <= 0.02 and r["cosine"] >= 0.995 for r in mine)
    # two bf16 passes subtracted at t = 950 cannot resolve a 0.01 restoration error
    assert not any(r["ok"] for r in rows if r["propagation"] == "two-pass")
    printed = capsys.readouterr().out
    assert "outside them: 0" in printed and printed.count("two-pass") == 3
