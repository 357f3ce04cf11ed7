"""The deployment files: the systemd unit verifies and its offline security exposure is 2.5 or lower, with its
paths pointed at this checkout (systemd-analyze); the alerting rules load and fire as their test file says
(promtool check rules, promtool test rules), on families the service exports."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

SYSTEMD_ANALYZE, PROMTOOL = shutil.which("systemd-analyze"), shutil.which("promtool")
UNIT = os.path.join(ROOT, "deploy", "llm-service.service")
MAX_EXPOSURE = 2.5


def unit_here(tmp_path) -> str:
    """The unit with its checkout and interpreter pointed at this one (systemd-analyze verify checks both)."""
    text = open(UNIT).read().replace("/opt/llm-psi/.venv/bin/python", sys.executable).replace("/opt/llm-psi", ROOT)
    path = tmp_path / "llm-service.service"
    path.write_text(text)
    return str(path)


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian: systemd)")
def test_the_unit_verifies_and_its_exposure_is_low(tmp_path):
    path = unit_here(tmp_path)
    v = subprocess.run([SYSTEMD_ANALYZE, "verify", path], capture_output=True, text=True, timeout=60)
    assert v.returncode == 0 and not v.stderr.strip(), v.stderr
    s = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", path], capture_output=True, text=True,
                       timeout=60)
    m = re.search(r"Overall exposure level for llm-service.service: ([\d.]+)", s.stdout)
    assert m, s.stdout[-500:] + s.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, s.stdout


def test_the_unit_runs_unprivileged_and_keeps_what_the_service_needs():
    d = dict(line.split("=", 1) for line in open(UNIT).read().splitlines()
             if "=" in line and not line.startswith("#"))
    assert d["DynamicUser"] == "yes" and d["CapabilityBoundingSet"] == "" and d["ProtectSystem"] == "strict"
    assert "llm_server.py serve" in d["ExecStart"] and "--host 127.0.0.1" in d["ExecStart"]
    assert "HF_HOME=/var/cache/llm-service" in d["Environment"] and d["CacheDirectory"] == "llm-service"
    assert "AF_INET" in d["RestrictAddressFamilies"] and d["ProtectControlGroups"] == "yes"
    assert "ProcSubset" not in d        # the service reads /proc/pressure/cpu, which ProcSubset=pid would hide


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus)")
def test_the_alerting_rules_check_and_pass_their_tests():
    deploy = os.path.join(ROOT, "deploy")
    c = subprocess.run([PROMTOOL, "check", "rules", "alerts.yml"], cwd=deploy, capture_output=True, text=True,
                       timeout=60)
    assert c.returncode == 0, c.stdout + c.stderr
    t = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=deploy, capture_output=True, text=True,
                       timeout=60)
    assert t.returncode == 0 and "SUCCESS" in t.stdout, t.stdout + t.stderr


def test_the_alerts_name_exported_families():
    import types
    from llm_psi.service.prometheus import Exporter
    from llm_psi.service.overload import DelayShedder
    svc = types.SimpleNamespace(counts={}, running=0, waiting=0, admission=None, overload=DelayShedder(1.0),
                                sharing=types.SimpleNamespace(state=lambda: {"share_quota_cores": 1.0,
                                                                             "share_others_pct": 5.0}),
                                cfg=types.SimpleNamespace(batching="off", max_batch=8, max_waiting=None, model=None))
    probe = types.SimpleNamespace(read=lambda: {"cg_cpu_some_avg10": 1.0}, cgroup=types.SimpleNamespace(own=True))
    state = types.SimpleNamespace(service=svc, probe=probe, draining=False, host_cpu=types.SimpleNamespace(share=0.1))
    text = Exporter(state, []).render()[0].decode()
    families = {ln.split()[2] for ln in text.splitlines() if ln.startswith("# HELP")}
    rules = open(os.path.join(ROOT, "deploy", "alerts.yml")).read()
    used = set(re.findall(r"\bllm_\w+", "\n".join(ln for ln in rules.splitlines() if "expr:" in ln)))
    assert used and used <= families, used - families
