"""benchmarks/pick_norm_launch.py names the sweep's fastest pixel-row setting, or the default."""
import json

import pytest

from benchmark_scripts import load
from diffloss_fast.ops.group_norm_silu import RowLaunch

LEVELS = ("256x256x256", "512x64x64", "1024x16x16")


def sweep(path, times):
    """A pytest-benchmark JSON as the sweep writes it: {setting: (ms at each level)}."""
    benchmarks = [{"name": f"test_group_norm_silu_launch[{level}-{setting or 'default'}]",
                   "extra_info": {"launch": setting, "level": level},
                   "stats": {"median": ms / 1e3}}
                  for setting, row in times.items() for level, ms in zip(LEVELS, row)]
    benchmarks.append({"name": "test_residual_bias_add[triton]", "extra_info": {},
                       "stats": {"median": 1.0}})  # another suite's result: ignored
    path.write_text(json.dumps({"benchmarks": benchmarks}))
    return path


def test_picks_the_least_summed_time(tmp_path, capsys):
    times = {"": (1.0, 0.30, 0.10),
             "reduce_stages=3": (0.80, 0.28, 0.11),      # sum 1.19: the fastest pixel rows
             "apply_tile=8192": (0.90, 0.25, 0.09),      # sum 1.24
             "groups:2048": (0.50, 0.20, 0.05),          # faster, but not what the variable sets
             "reduce_tile=8192": (0.10, 0.10)}           # a level missing: not comparable
    load("pick_norm_launch").main([str(sweep(tmp_path / "s.json", times))])
    out, err = capsys.readouterr()
    assert out.strip() == "reduce_stages=3"
    RowLaunch.parse(out.strip())  # a value the variable accepts
    assert "groups:2048" in err and "0.80x" in err  # the table: each level against the default


@pytest.mark.parametrize("best, margin, expect", [(0.99, 0.02, ""), (0.97, 0.02, "apply_tile=2048"),
                                                  (0.97, 0.05, "")])
def test_names_the_default_unless_beaten_by_the_margin(tmp_path, capsys, best, margin, expect):
    times = {"": (1.0, 1.0, 1.0), "apply_tile=2048": (best, best, best)}
    load("pick_norm_launch").main([str(sweep(tmp_path / "s.json", times)), "--margin", str(margin)])
    assert capsys.readouterr().out.strip() == expect


def test_refuses_a_sweep_without_the_default(tmp_path):
    path = sweep(tmp_path / "s.json", {"reduce_stages=3": (1.0, 1.0, 1.0)})
    with pytest.raises(SystemExit, match="default setting was not timed"):
        load("pick_norm_launch").main([str(path)])


def test_refuses_an_unreadable_result(tmp_path):
    """A sweep that wrote nothing (every benchmark skipped, or cut off) is an error the device
    check reads as "keep the default"."""
    empty = tmp_path / "empty.json"
    empty.write_text("")
    for path in (empty, tmp_path / "missing.json"):
        with pytest.raises(SystemExit, match="cannot read"):
            load("pick_norm_launch").main([str(path)])
