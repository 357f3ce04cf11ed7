"""The run of one cell: the service opened (in-process or remote), the cell's files, the warm-up and the
co-tenant, its planned trials one after another (llm_psi.load.trial), and the metadata JSON completed at the
end, also when the run is interrupted (Ctrl-C or SIGTERM: exit status 130, finished rows kept)."""
from __future__ import annotations

import dataclasses
import json
import logging
import resource
import signal
import sys
import threading
import time
from datetime import datetime, timezone

from llm_psi import config as configs
from llm_psi.analysis import metrics
from llm_psi.cgroups import CgroupProbe
from llm_psi.cli import UsageError
from llm_psi.config import PROMPTS, RunConfig, service_config
from llm_psi.load import cotenant
from llm_psi.load.cell_files import CellFiles, CsvSink, check_output, write_json
from llm_psi.load.environment import environment
from llm_psi.load.trial import InProcess, run_trial
from llm_psi.service import lifecycle as service
from llm_psi.service.lifecycle import Service


def load_prompts(cfg: RunConfig) -> list[str]:
    if cfg.prompts_file is None:
        return list(PROMPTS)
    try:
        with open(cfg.prompts_file, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read prompts file {cfg.prompts_file}: {getattr(e, 'strerror', None) or e}")
    if not prompts:
        raise UsageError(f"prompts file {cfg.prompts_file} has no prompts")
    return prompts


class _Terminate(BaseException):
    """SIGTERM, handled like Ctrl-C."""


def _on_sigterm(signum, frame):
    raise _Terminate()


def _open_service(cfg: RunConfig):
    """(client, engine identity, service description) for the cell: an in-process Service, or the remote one."""
    if cfg.target is not None:
        from llm_psi.load import http_client
        try:
            client = http_client.Remote(cfg.target, cfg.config, wait_s=cfg.wait_ready_s)
        except http_client.RemoteError as e:
            raise UsageError(str(e)) from None
        return client, client.info["service"]["model"], client
    try:
        svc = Service.start(service_config(cfg))
    except Exception as e:
        if isinstance(e, service.PsiUnavailable):
            raise UsageError(str(e)) from None
        raise
    return InProcess(svc), svc.engine.identity(), svc


class CellRun:
    """The open cell of one run: its client and service, metadata, CSV sink, stop event and co-tenant."""

    def __init__(self, cfg: RunConfig, cell: CellFiles, client, identity: dict, svc):
        self.cfg, self.cell, self.client, self.svc = cfg, cell, client, svc
        self.probe = CgroupProbe() if cfg.target is None else client
        self.meta = cell.open({"config": dataclasses.asdict(cfg), "argv": sys.argv,
                               "limited": configs.is_limited(cfg.config),
                               "mode": "in-process" if cfg.target is None else "service",
                               "start_wall": datetime.now(timezone.utc).isoformat(),
                               "environment": environment(identity), "cgroup": self.probe.describe(), "trials": []})
        if cfg.target is not None:
            self.meta["service"] = client.info
        self.sink = CsvSink(cfg.output)
        write_json(cell.json, self.meta)
        self.stop = threading.Event()
        self.tenant = None

    def warm_up(self, prompts: list[str]) -> None:
        """The untimed warm-up request, then the co-tenant (if any) starts: it shares the measured trials only."""
        cfg = self.cfg
        if cfg.warmup:  # excluded from the results: first-call allocations and lazy initialisation
            w0 = time.monotonic()
            self.client.send(prompts[0], cfg.max_new_tokens, cfg.seed, None)
            self.meta["warmup_s"] = time.monotonic() - w0
        if cfg.antagonist is not None:  # after the warm-up: the co-tenant shares the measured trials only
            self.tenant = cotenant.Cotenant(cfg.antagonist, quota_pct=cfg.antagonist_quota,
                                            log=lambda m: print(m, file=sys.stderr))
            self.tenant.start()
            self.meta["cotenant"] = self.tenant.describe()
            write_json(self.cell.json, self.meta)

    def run_trials(self, todo: list[int], prompts: list[str]) -> None:
        for n, trial in enumerate(todo):
            if n > 0 and self.cfg.target is None:  # trials are independent repeats: a fresh controller
                self.svc.renew_admission()
            run_trial(self.cfg, self.client, prompts, self.sink, trial, self.stop, self.probe, self.tenant,
                      self.record)

    def record(self, record: dict) -> None:
        """A trial's record into the metadata, written at once."""
        if self.cfg.target is None:
            record["service_counts"] = dict(self.svc.counts)
        self.meta["trials"] = sorted(self.meta["trials"] + [record], key=lambda r: r["trial"])
        write_json(self.cell.json, self.meta)

    def close(self) -> None:
        """Stop the co-tenant, close the service and the rows, and complete the metadata."""
        meta = self.meta
        if self.tenant is not None:
            self.tenant.stop()
        if self.cfg.target is None:
            self.svc.close()
        else:
            self.client.close()
        self.sink.close()  # flushed to the disk before the cell can be marked complete
        meta["end_wall"] = datetime.now(timezone.utc).isoformat()
        use = resource.getrusage(resource.RUSAGE_SELF)    # this process's own CPU: in service mode, what the
        meta["client_cpu_s"] = round(use.ru_utime + use.ru_stime, 3)   # load generator took beside the service
        meta["counts"] = {s: sum(t["counts"].get(s, 0) for t in meta["trials"]) for s in metrics.STATUSES}
        meta["peak_in_flight"] = max((t["peak_in_flight"] for t in meta["trials"]), default=0)
        meta["complete"] = self.cell.is_complete(meta)
        write_json(self.cell.json, meta)


def run(cfg: RunConfig) -> int:
    """Run the planned trials of one cell; return the exit status (130 if interrupted)."""
    logging.basicConfig(level=logging.DEBUG if cfg.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    prompts = load_prompts(cfg)
    check_output(cfg.output)
    if cfg.target is None:
        service.check_limits(cfg.config)
    cell = CellFiles(cfg)
    todo = cell.plan()
    if not todo:
        print(f"{cfg.output}: trial(s) {cfg.trial or 'all'} already finished; skipped (--resume)", file=sys.stderr)
        return 0
    if not cfg.quiet:  # the JSON beside the CSV always holds it
        print(f"run config: {json.dumps(dataclasses.asdict(cfg))}", file=sys.stderr)
    client, identity, svc = _open_service(cfg)  # before any file is written: no PSI here fails cleanly
    cell_run = CellRun(cfg, cell, client, identity, svc)
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    status = 0
    try:
        cell_run.warm_up(prompts)
        cell_run.run_trials(todo, prompts)
    except (KeyboardInterrupt, _Terminate):
        cell_run.stop.set()
        cell_run.meta["interrupted"] = True
        status = 130
        print(f"interrupted: finished rows kept in {cfg.output}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        cell_run.close()
    return status
