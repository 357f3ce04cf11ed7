"""bench.cotenant: the report from synthetic cell files, the plan, the steps with a fake runner, the CLI."""
import json
import math
import os
import pathlib

import numpy as np
import pandas as pd
import pytest

from bench import cotenant as bc
from bench import cotenant_report as rep
from llm_psi import config as configs
from llm_psi.service import telemetry
from llm_psi.load.cell_files import COLUMNS
from conftest import real_cgroups, run_script

SLO = "ttft:5000,e2e:15000"
REFERENCE = {"antagonist": "cpu:2", "seconds": 30, "elapsed_s": 30.0, "units_per_s": 2000.0, "interrupted": False}
# Four ok requests and one rejected: ttft 1, 2, 6, 1 s; e2e 2, 16, 7, 3 s; service = e2e - 0.5 s.
SUBMIT, TTFT, E2E = [0.0, 1.0, 2.0, 3.0], [1.0, 2.0, 6.0, 1.0], [2.0, 16.0, 7.0, 3.0]
GATE = [("admitted", 1), ("admitted", 3), ("admitted_after_timeout", 10), ("admitted_after_timeout", 1),
        ("rejected", 10)]


def write_cell(stem, config, antagonist=None, rate=1.0, units_per_s=None, timeline=None, complete=True,
               gate=GATE, slo=SLO, scale=1.0):
    """A synthetic cell as the generator writes it: <stem>.csv, .json and _timeline.csv (if timeline)."""
    rows = []
    for i, (sub, ttft, e2e) in enumerate(zip(SUBMIT, TTFT, E2E)):
        rows.append(dict(trial=1, request_id=i, config=config, status="ok", t_intended_s=sub, t_submit_s=sub,
                         t_dequeue_s=sub, t_admit_s=sub, t_start_s=sub + 0.5, t_first_token_s=sub + ttft * scale,
                         t_end_s=sub + e2e * scale, output_tokens=2))
    rows.append(dict(trial=1, request_id=4, config=config, status="rejected", t_intended_s=4.0, t_submit_s=4.0,
                     t_dequeue_s=4.0, output_tokens=0))
    for row, (decision, checks) in zip(rows, gate or []):
        row.update(gate_decision=decision, gate_checks=checks)
    pd.DataFrame(rows).reindex(columns=COLUMNS).to_csv(f"{stem}.csv", index=False)
    trial = {"trial": 1, "complete": complete}
    if units_per_s is not None:
        trial["cotenant"] = {"mean_units_per_s": units_per_s, "per_second": []}
    meta = {"config": {"config": config, "antagonist": antagonist, "rate": rate, "slo": slo,
                       "arrival": "poisson"}, "complete": complete, "trials": [trial]}
    with open(f"{stem}.json", "w") as f:
        json.dump(meta, f)
    if timeline is not None:
        pd.DataFrame(timeline).reindex(columns=telemetry.TIMELINE_COLUMNS).to_csv(
            f"{stem}_timeline.csv", index=False)


def write_capacity(d, config, antagonist, span_s, n_ok):
    """A closed-loop capacity cell with n_ok ok requests, the last ending at span_s: capacity n_ok / span_s."""
    os.makedirs(d / "capacity", exist_ok=True)
    ends = np.linspace(span_s / n_ok, span_s, n_ok)
    rows = [dict(trial=1, request_id=i, config=config, status="ok", t_submit_s=0.0, t_dequeue_s=0.0, t_admit_s=0.0,
                 t_start_s=0.0, t_first_token_s=0.1, t_end_s=e, output_tokens=2) for i, e in enumerate(ends)]
    stem = d / "capacity" / f"{config}_{bc.tenant_label(antagonist)}"
    pd.DataFrame(rows).reindex(columns=COLUMNS).to_csv(f"{stem}.csv", index=False)
    with open(f"{stem}.json", "w") as f:
        json.dump({"config": {"config": config, "antagonist": antagonist}, "complete": True,
                   "trials": [{"trial": 1}]}, f)


TIMELINE = {"t_s": [0.0, 0.25, 0.5, 0.75, 1.0], "trial": [1] * 5,
            "sys_cpu_some_avg10": [50.0, 96.0, 94.0, 99.0, np.nan],     # 2 of 4 samples over 95, first at 0.25
            "cg_cpu_some_avg10": [10.0, 20.0, 95.0, 40.0, 50.0],         # never over (95 is not > 95)
            "limit": [1, 2, 4, 2, 1]}


def table_rows(text):
    """{(config, co-tenant): [cells...]} of the cells table in table.md."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 16 and cells[0] != "config":
            out[(cells[0], cells[2])] = cells
    return out


@pytest.fixture
def results(tmp_path):
    with open(tmp_path / "reference.json", "w") as f:
        json.dump(REFERENCE, f)
    write_capacity(tmp_path, "cgroups", None, 4.0, 4)          # 1.0 req/s
    write_capacity(tmp_path, "cgroups", "cpu:2", 8.0, 4)       # 0.5 req/s
    write_cell(tmp_path / "psi_none", "psi", rate=0.7, timeline=TIMELINE)
    write_cell(tmp_path / "psi_cpu2", "psi", "cpu:2", rate=0.35, units_per_s=500.0, timeline=TIMELINE)
    write_cell(tmp_path / "adaptive_cpu2", "adaptive", "cpu:2", units_per_s=1500.0, timeline=TIMELINE,
               complete=False)
    write_cell(tmp_path / "baseline_none", "baseline", gate=None, scale=0.5)
    return tmp_path


def test_report_values_are_hand_computed(results, capsys):
    assert bc.main(["--report-only", "--results-dir", str(results)]) == 0
    printed = capsys.readouterr().out
    text = (results / "table.md").read_text()
    assert printed == text and f"SLO {SLO}" in text
    rows = table_rows(text)
    assert list(rows) == [("psi", "none"), ("psi", "cpu:2"), ("adaptive*", "cpu:2"), ("baseline", "none")]
    # config limited tenant rate ok rej p95e2e p95svc goodput share sys first cg first deferred limit
    psi = rows[("psi", "cpu:2")]
    assert psi[1] == "yes" and psi[3] == "0.350" and psi[4:6] == ["4", "1"]
    assert psi[6] == "14.65" and psi[7] == "14.15"      # numpy p95 of 2,3,7,16 and of 1.5,2.5,6.5,15.5
    assert psi[8] == f"{2 / 17:.3f}"                     # 2 requests meet both bounds; span 0 .. 17 s
    assert psi[9] == "25%"                               # 500 / 2000 units/s
    assert psi[10:14] == ["50%", "0.2", "0%", "—"]
    assert psi[14] == "4" and psi[15] == "—"             # 3 checks, 10 checks (twice), after timeout with 1 check
    assert rows[("psi", "none")][9] == "—"
    assert rows[("adaptive*", "cpu:2")][9] == "75%" and rows[("adaptive*", "cpu:2")][15] == "1–4"
    base = rows[("baseline", "none")]
    assert base[1] == "no" and base[6] == f"{np.percentile([1, 8, 3.5, 1.5], 95):.2f}" and base[14] == "0"
    assert base[10] == "—" and base[15] == "—"           # no timeline
    assert base[8] == f"{4 / 9:.3f}"                     # halved: ttft 3 s and e2e 8 s meet too; span 0 .. 9 s
    summary = pd.read_csv(results / "summary.csv")
    assert summary["cotenant_share"].tolist()[1:3] == [0.25, 0.75]
    assert summary.loc[1, "sys_first_cross_s"] == 0.25 and summary.loc[1, "sys_over_frac"] == 0.5
    assert (results / "cotenant.png").stat().st_size > 1000
    cap = [line for line in text.splitlines() if line.startswith("| limited")]
    assert cap == ["| limited | cgroups | none | 1.000 | 4 | 3.85 |", "| limited | cgroups | cpu:2 | 0.500 | 4 | 7.70 |"]


def test_report_slo_option_and_cells_slo(results, capsys):
    assert bc.main(["--report-only", "--results-dir", str(results), "--slo", "e2e:2500"]) == 0
    psi = table_rows(capsys.readouterr().out)[("psi", "cpu:2")]
    assert psi[8] == f"{1 / 17:.3f}"                     # only the 2 s request
    for stem in ("psi_none", "psi_cpu2", "adaptive_cpu2", "baseline_none"):   # the cells' own SLO by default
        meta = json.loads((results / f"{stem}.json").read_text())
        meta["config"]["slo"] = "e2e:3500"
        (results / f"{stem}.json").write_text(json.dumps(meta))
    assert bc.main(["--report-only", "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    assert "SLO e2e:3500" in out and table_rows(out)[("psi", "cpu:2")][8] == f"{2 / 17:.3f}"


def test_figure_panels(results):
    summary = rep.summary_frame(str(results), {"e2e_ms": 15000.0})
    e2e = rep.e2e_panel(summary)
    assert list(e2e.index) == ["psi", "adaptive", "baseline"] and list(e2e.columns) == ["none", "cpu:2"]
    assert e2e.loc["psi", "none"] == pytest.approx(14.65) and math.isnan(e2e.loc["adaptive", "none"])
    share = rep.share_panel(summary)
    assert share.to_dict() == {"psi": 0.25, "adaptive": 0.75}


def test_crossing_deferred_share_units():
    tl = pd.DataFrame(TIMELINE)
    assert rep.crossing(tl, "sys_cpu_some_avg10") == (0.5, 0.25)
    frac, first = rep.crossing(tl, "cg_cpu_some_avg10")
    assert frac == 0.0 and math.isnan(first)
    assert all(math.isnan(x) for x in rep.crossing(tl.assign(cg_cpu_some_avg10=np.nan), "cg_cpu_some_avg10"))
    assert all(math.isnan(x) for x in rep.crossing(None, "sys_cpu_some_avg10"))
    df = pd.DataFrame({"gate_checks": [1, 2, np.nan, 1], "gate_decision": ["admitted", "admitted", np.nan,
                                                                          "admitted_after_timeout"]})
    assert rep.deferred(df) == 2
    meta = {"config": {"antagonist": "cpu:2"}, "trials": [{"cotenant": {"mean_units_per_s": 400.0}},
                                                          {"cotenant": {"mean_units_per_s": 800.0}}]}
    assert rep.cotenant_share(meta, REFERENCE) == pytest.approx(0.3)
    assert math.isnan(rep.cotenant_share(meta, {**REFERENCE, "antagonist": "cpu:4"}))   # another co-tenant
    assert math.isnan(rep.cotenant_share({"config": {"antagonist": None}, "trials": []}, REFERENCE))
    assert math.isnan(rep.cotenant_share(meta, None))


CAPACITY = {("limited", "none"): 2.0, ("limited", "cpu2"): 1.0, ("unlimited", "none"): 10.0,
            ("unlimited", "cpu2"): 4.0}


def test_plan_is_a_seeded_shuffle_with_rates_by_setting():
    cells = bc.plan(bc.CONFIGS, "cpu:2", CAPACITY, 0.7, seed=3)
    pairs = [(c["config"], c["antagonist"]) for c in cells]
    canonical = [(c, t) for c in bc.CONFIGS for t in (None, "cpu:2")]
    assert len(pairs) == 16 and sorted(pairs, key=str) == sorted(canonical, key=str)
    assert pairs != canonical                                           # shuffled,
    assert pairs == [(c["config"], c["antagonist"]) for c in bc.plan(bc.CONFIGS, "cpu:2", CAPACITY, 0.7, seed=3)]
    assert pairs != [(c["config"], c["antagonist"]) for c in bc.plan(bc.CONFIGS, "cpu:2", CAPACITY, 0.7, seed=4)]
    first_half = {c for c, _ in pairs[:8]}                              # and mixed: not config by config
    assert len(first_half) >= 4
    rate = {(c["config"], c["tenant"]): c["rate"] for c in cells}
    assert rate[("psi", "none")] == 1.4 and rate[("batch_psi", "cpu2")] == 0.7
    assert rate[("baseline", "none")] == 7.0 and rate[("psi_unlimited", "cpu2")] == 2.8
    assert {c["setting"] for c in cells if c["config"] in ("baseline", "psi_unlimited")} == {"unlimited"}
    caps = bc.capacity_cells(bc.CONFIGS, "cpu:2")
    assert [(c["config"], c["tenant"]) for c in caps] == [("cgroups", "none"), ("cgroups", "cpu2"),
                                                          ("baseline", "none"), ("baseline", "cpu2")]


def test_commands(tmp_path):
    a = bc.parse_args(["--tiny", "--max-new-tokens", "3", "--num-requests", "5", "--seed", "7"])
    cell = dict(config="psi_cgroup", antagonist="cpu:2", rate=1.25)
    cmd = bc.generator_cmd(a, cell, "x.csv")
    for pair in (["--arrival", "poisson"], ["--rate", "1.25"], ["--num-requests", "5"], ["--concurrency", "4"],
                 ["--seed", "7"], ["--slo", bc.DEFAULT_SLO], ["--antagonist", "cpu:2"], ["--output", "x.csv"]):
        assert " ".join(pair) in " ".join(cmd)
    assert "--force" in cmd and "--tiny" in cmd
    cap = bc.generator_cmd(a, dict(config="cgroups", antagonist=None), "c.csv")
    assert "--arrival" not in cap and "--antagonist" not in cap and "--num-requests 12 --spacing-ms 0" in " ".join(cap)
    limited = bc.wrap("psi_cgroup", "x.json", ["gen"], root=True)
    assert limited[2:] == ["run", "--name", "llm_service", "--cpu-quota", "50", "--cpu-period-us", "100000",
                           "--memory-max", "4G", "--meta", "x.json", "--", "gen"]
    assert bc.wrap("baseline", "x.json", ["gen"], root=True)[5:] == ["--unlimited", "--meta", "x.json", "--", "gen"]
    assert bc.wrap("psi_unlimited", "x.json", ["gen"], root=False) == ["gen"]


class FakeRunner:
    """Stands in for bc.call: writes what the step would (reference, a synthetic cell) and records the commands."""

    def __init__(self, interrupt_at=None):
        self.cmds, self.interrupt_at = [], interrupt_at

    def __call__(self, cmd):
        self.cmds.append(cmd)
        if self.interrupt_at is not None and len(self.cmds) == self.interrupt_at:
            raise KeyboardInterrupt
        if "--json" in cmd:
            with open(cmd[cmd.index("--json") + 1], "w") as f:
                json.dump(REFERENCE, f)
            return 0
        out = cmd[cmd.index("--output") + 1]
        config = cmd[cmd.index("--config") + 1]
        spec = cmd[cmd.index("--antagonist") + 1] if "--antagonist" in cmd else None
        if "--rate" in cmd:
            write_cell(out[:-4], config, spec, rate=float(cmd[cmd.index("--rate") + 1]),
                       units_per_s=1000.0 if spec else None, timeline=TIMELINE)
        else:
            write_capacity(pathlib.Path(out).parent.parent, config, spec, 4.0 if configs.is_limited(config) else 1.0, 4)
        return 0


@pytest.mark.slow
def test_full_run_with_a_fake_runner_then_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    fake = FakeRunner()
    monkeypatch.setattr(bc, "call", fake)
    d = tmp_path / "res"
    assert bc.main(["--results-dir", str(d), "--seed", "5"]) == 0
    assert len(fake.cmds) == 1 + 4 + 16 and "llm_psi.load.cotenant" in fake.cmds[0]
    opened = [(c[c.index("--config") + 1], "--antagonist" in c) for c in fake.cmds[5:]]
    planned = bc.plan(bc.CONFIGS, "cpu:2", {k: 1.0 for k in CAPACITY}, 0.7, seed=5)
    assert opened == [(c["config"], c["antagonist"] is not None) for c in planned]   # the cells in the plan's order
    rates = {(c[c.index("--config") + 1], "--antagonist" in c): float(c[c.index("--rate") + 1])
             for c in fake.cmds[5:]}
    assert rates[("psi", False)] == 0.7 and rates[("baseline", True)] == 2.8       # 0.7 x 1 and 0.7 x 4 req/s
    err = capsys.readouterr().err
    assert "cell 16/16" in err and " min] " in err
    assert len(table_rows((d / "table.md").read_text())) == 16
    assert (d / "summary.csv").exists() and (d / "cotenant.png").exists()
    assert bc.main(["--results-dir", str(d)]) == 2                                 # neither --force nor --resume
    assert "--resume completes" in capsys.readouterr().err
    os.remove(d / "psi_cpu2.json")                                                 # one unfinished cell
    assert bc.main(["--results-dir", str(d), "--resume", "--seed", "5"]) == 0
    assert len(fake.cmds) == 22 and "--resume" in fake.cmds[-1]
    assert fake.cmds[-1][fake.cmds[-1].index("--output") + 1].endswith("psi_cpu2.csv")


def test_interrupt_keeps_finished_cells(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(bc, "call", FakeRunner(interrupt_at=8))
    d = tmp_path / "res"
    assert bc.main(["--results-dir", str(d)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert len(rep.cells_in(str(d))) == 2 and len(rep.cells_in(str(d / "capacity"))) == 4


def test_refusals_before_anything_runs(tmp_path, monkeypatch, capsys):
    def never(cmd):
        raise AssertionError(f"ran {cmd}")
    monkeypatch.setattr(bc, "call", never)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert bc.main(["--results-dir", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert "must run as root" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    write_capacity(tmp_path, "cgroups", None, 4.0, 4)
    (tmp_path / "capacity" / "cgroups_none.json").unlink()        # a CSV alone is a result too
    assert bc.main(["--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "holds results" in err and len(err.strip().splitlines()) == 1
    assert bc.main(["--report-only", "--results-dir", str(tmp_path / "empty")]) == 2
    assert "no cells" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--load", "0"], ["--load", "nan"], ["--num-requests", "0"], ["--seed", "-1"],
                                  ["--max-new-tokens", "0"], ["--reference-seconds", "-2"], ["--slo", "e2e:0"],
                                  ["--slo", "speed:5"], ["--antagonist", "cpu:0"], ["--antagonist", " "],
                                  ["--configs", "psi,nope"], ["--force", "--resume"]])
def test_bad_arguments_exit_2(args, capsys):
    with pytest.raises(SystemExit) as e:
        bc.parse_args(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "error:" in err


def test_cli_one_line_error():
    proc = run_script("bench.cotenant", "--load", "-1", timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--load" in proc.stderr


@pytest.mark.slow
@real_cgroups
def test_end_to_end_smoke(tmp_path):
    """Real cgroups (root): one limited configuration, tiny model, 2 tokens a request, a 1 s reference; the
    load is low enough that an open-loop trial lasts over a second (the co-tenant is sampled every second).
    ``cgroups``, not a gated configuration: the gate defers every request up to 5 s whenever the host's PSI is
    high, as it is while other tests run beside this one."""
    d = tmp_path / "res"
    proc = run_script("bench.cotenant", "--results-dir", d, "--tiny", "--num-requests", "10", "--max-new-tokens",
                      "2", "--load", "0.25", "--reference-seconds", "1", "--configs", "cgroups", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cell 2/2" in proc.stderr
    rows = table_rows((d / "table.md").read_text())
    assert set(rows) == {("cgroups", "none"), ("cgroups", "cpu:2")}
    assert rows[("cgroups", "none")][4] == "10" and rows[("cgroups", "none")][9] == "—"
    assert rows[("cgroups", "cpu:2")][9].endswith("%")
    assert (d / "capacity" / "cgroups_cpu2.csv").exists() and (d / "cotenant.png").exists()
    assert json.loads((d / "reference.json").read_text())["units_per_s"] > 0


def test_unlimited_only_runs_without_root_directly(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    fake = FakeRunner()
    monkeypatch.setattr(bc, "call", fake)
    assert bc.main(["--results-dir", str(tmp_path / "res"), "--configs", "baseline,psi_unlimited"]) == 0
    assert len(fake.cmds) == 1 + 2 + 4
    assert all("request_generator.py" in cmd[1] for cmd in fake.cmds[1:])       # no cgroup_lib.py run
    assert {cmd[cmd.index("--config") + 1] for cmd in fake.cmds[1:3]} == {"baseline"}
