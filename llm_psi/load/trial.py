"""One trial of a cell: its requests sent on the load's schedule (closed or open loop) to the client, one CSV
row per finished request, the pressure/throttling timeline and the co-tenant's throughput sampled meanwhile,
and a record of the trial for the cell's metadata."""
from __future__ import annotations

import concurrent.futures as cf
import math
import sys
import threading
import time
from datetime import datetime, timezone

from llm_psi.analysis import metrics
from llm_psi.cgroups import counter_delta
from llm_psi.config import RunConfig
from llm_psi.load import cotenant
from llm_psi.load.probe import summarize as probe_summary
from llm_psi.service import lifecycle as service
from llm_psi.service.lifecycle import Service


def make_timeline(cfg: RunConfig, trial: int, t0: float, state_fn):
    from llm_psi.service.telemetry import TimelineSampler
    return TimelineSampler(cfg.stem + "_timeline.csv", cfg.timeline_interval_ms, trial, state_fn, t0)


class InProcess:
    """The client of an in-process Service: its Outcome, on this process's clock."""

    def __init__(self, svc: Service):
        self.service = svc

    def send(self, prompt, max_tokens, seed, stop):
        return self.service.submit(prompt, max_tokens, seed=seed, stop=stop), None

    def state(self) -> dict:
        return self.service.state()


class Trial:
    """One trial of a cell: requests sent on the load's schedule (closed or open loop) to the client, rows
    written as they finish."""

    def __init__(self, cfg, client, prompts, sink, trial, stop, progress, times):
        self.cfg, self.client, self.prompts, self.sink = cfg, client, prompts, sink
        self.trial, self.stop, self.progress, self.times = trial, stop, progress, times
        self.lock = threading.Lock()
        self.in_flight = self.peak_in_flight = 0
        self.counts = {s: 0 for s in metrics.STATUSES}
        self.t0 = 0.0  # set by the caller just before run(): the trial's clock origin
        self.halt = threading.Event()  # this trial's requests stop: the run is interrupted or its deadline passed
        self.cut = False  # the deadline ended the trial: nothing sent after it; the requests it stopped are 'cut' rows
        self.tenant = None  # the co-tenant, whose cumulative work goes into the timeline
        self._probe_at = 0  # the probe records the timeline has seen

    def state(self) -> dict:
        st = {"in_flight": self.in_flight, **(self.client.state() or {})}
        if self.tenant is not None:
            st.update(cotenant_units=self.tenant.units(), cotenant_cpu_s=self.tenant.cpu_usage_s(),
                      cotenant_on=0 if self.tenant.paused else 1)
            if self.tenant.probe_spec:
                records, self._probe_at = self.tenant.probe_records(self._probe_at)
                s = probe_summary(records)  # over the last interval; NaN where the probe did not run
                st.update(probe_wake_p99_ms=round(s["wake_p99_ms"], 3), probe_delay_p99_ms=round(s["delay_p99_ms"], 3))
        return st

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _one(self, rid: int, t_submit: float) -> None:
        cfg = self.cfg
        pid = rid % len(self.prompts)
        prompt = self.prompts[pid]
        row = dict(trial=self.trial, request_id=rid, config=cfg.config, concurrency=cfg.concurrency,
                   prompt_id=pid, prompt_chars=len(prompt), t_submit_s=t_submit, t_dequeue_s=self._now(),
                   t_intended_s=self.times[rid] if cfg.arrival != "closed" else None)
        if self.halt.is_set():
            return  # never sent
        with self.lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            seed = metrics.request_seed(cfg.seed, self.trial, rid)
            out, srv = self.client.send(prompt, cfg.max_new_tokens, seed, self.halt)
        except Exception as e:
            if not (isinstance(e, service.Interrupted) or self.halt.is_set()):
                raise
            if self.stop.is_set() or not self.cut:
                return  # an unfinished request of an interrupted run is not a result
            out, srv = service.Outcome(status="cut", error=f"in flight at the deadline ({cfg.deadline_s:g} s)",
                                       t_end=self.t0 + cfg.deadline_s), None
        finally:
            with self.lock:
                self.in_flight -= 1
        rel = lambda t: None if t is None else t - self.t0  # noqa: E731
        row.update(status=out.status, error=out.error, prompt_tokens=out.prompt_tokens,
                   output_tokens=out.output_tokens, gate_decision=out.decision, gate_checks=out.checks,
                   gate_pressure=out.pressure, t_admit_s=rel(out.t_admit), t_start_s=rel(out.t_start),
                   t_first_token_s=rel(out.t_first_token), t_end_s=rel(out.t_end), instance=out.instance)
        if srv:
            row.update({f"srv_{k}_s": v for k, v in srv.items()})
        self.sink.write(row)
        with self.lock:
            self.counts[row["status"]] += 1
        self.progress.update(1)

    def run(self) -> None:
        """Send request i at t0 + times[i] into a pool: C workers (closed loop: a request waits for a free
        worker) or one per request up to --max-concurrency (open loop).

        The closed loop hands the pool a request only when one of its C workers is free, so that a deep plan
        (a saturating load of 100000 requests cut by a deadline) costs nothing up front: queued all at once,
        it took this process seconds of CPU at the start and the end of a trial, beside whatever it measured.
        A request's t_submit is still the time it joined the client's queue: its time in the plan, or the
        time the loop reached it if that was later, not the time a worker came free (t_dequeue)."""
        cfg = self.cfg
        closed = cfg.arrival == "closed"
        workers = cfg.concurrency if closed else (cfg.max_concurrency or len(self.times))
        pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="worker")
        free = threading.Semaphore(workers) if closed else None
        futures = []
        end = math.inf if cfg.deadline_s is None else cfg.deadline_s
        timer = threading.Timer(max(0.0, self.t0 + end - time.monotonic()), self._deadline)
        if cfg.deadline_s is not None:
            timer.start()
        try:
            slot_waits = 0.0        # closed loop: the time the loop spent waiting for a free worker
            for rid, t in enumerate(self.times):
                if t >= end:
                    self.cut = True  # the deadline ended the schedule
                if self.cut or self.halt.wait(max(0.0, self.t0 + t - time.monotonic())):
                    break  # nothing is sent at or after the deadline
                t_submit = max(t, self._now() - slot_waits) if closed else self._now()
                if closed:
                    waited = time.monotonic()
                    while not (self.halt.is_set() or free.acquire(timeout=0.05)):
                        pass
                    if self.halt.is_set():
                        break
                    slot_waits += time.monotonic() - waited
                fut = pool.submit(self._one, rid, t_submit)
                if closed:
                    fut.add_done_callback(lambda _f: free.release())
                futures.append(fut)
            for fut in cf.as_completed(futures):
                fut.result()
        except BaseException:
            self.stop.set()
            self.halt.set()  # workers abandon their generation at the next token
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            timer.cancel()
        pool.shutdown(wait=True)

    def _deadline(self) -> None:
        self.cut = True
        self.halt.set()


def send_times(cfg: RunConfig, trial: int) -> list[float]:
    """Intended send times (s after the trial's start): the closed loop's spacing, or the open loop's
    schedule drawn from the seed and the trial (each trial its own draw, repeatable)."""
    if cfg.arrival == "closed":
        return [i * cfg.spacing_ms / 1000.0 for i in range(cfg.num_requests)]
    from llm_psi.load import arrivals
    n = None if cfg.duration is not None else cfg.num_requests
    return list(arrivals.schedule(cfg.arrival, cfg.rate, n=n, duration=cfg.duration, burstiness=cfg.burstiness,
                                  seed=metrics.schedule_seed(cfg.seed, trial)))


def _summary_line(cfg: RunConfig, trial: int, rows_path: str, wall_s: float, peak: int) -> str:
    import pandas as pd
    df = pd.read_csv(rows_path)
    s = metrics.summarize(df[df["trial"] == trial], slo=_slo(cfg))
    line = (f"[{cfg.config} c={cfg.concurrency} trial {trial}/{cfg.trials}] ok {s['n_ok']} rejected "
            f"{s['n_rejected']} failed {s['n_failed']} cut {s['n_cut']} | p95 e2e {s['p95_e2e_ms'] / 1000:.2f} s | "
            f"p95 service {s['p95_service_ms'] / 1000:.2f} s | peak in-flight {peak} | {wall_s:.1f} s wall")
    if cfg.arrival != "closed":
        line += f" | p95 lateness {s.get('p95_lateness_ms', math.nan):.1f} ms"
    if cfg.slo:
        line += f" | goodput {s['goodput_rps']:.3f} req/s"
    return line


def _slo(cfg: RunConfig):
    if not cfg.slo:
        return None
    from llm_psi.load import arrivals
    return arrivals.parse_slo(cfg.slo)


def probe_phases(records, t0: float, schedule_text) -> dict:
    """The probe's delays over the trial ('probe') and, with a schedule, per phase ('probe_phases'); records
    are (monotonic t_s, wake_ms, done_ms)."""
    out = {"probe": probe_summary(records)}
    if schedule_text:
        from llm_psi.analysis import phases
        schedule = phases.parse_schedule(schedule_text)
        by = {p: [r for r in records if phases.phase_of(r[0] - t0, schedule) == p] for p in phases.PHASES}
        out["probe_phases"] = {p: probe_summary(rs) for p, rs in by.items()}
    return out


def cotenant_summary(rows: list[dict]) -> dict:
    """The co-tenant's throughput during a trial: its per-second samples and their mean."""
    rates = [r["units_per_s"] for r in rows if r.get("units_per_s") is not None]
    shares = [r["cpu_share"] for r in rows if r.get("cpu_share") is not None]
    return {"mean_units_per_s": sum(rates) / len(rates) if rates else None,
            "mean_cpu_share": sum(shares) / len(shares) if shares else None, "per_second": rows}


class Schedule:
    """Daemon thread: the co-tenant on and off on cfg.antagonist_schedule from t0 (pause/resume)."""

    def __init__(self, text, tenant, t0):
        from llm_psi.analysis import phases
        schedule = phases.parse_schedule(text)
        self.items, self.tenant, self.t0 = phases.boundaries(schedule), tenant, t0
        self.length_s = sum(secs for _, secs in schedule)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cotenant-schedule", daemon=True)

    def _run(self):
        for start, state in self.items:
            if self._stop.wait(max(0.0, self.t0 + start - time.monotonic())):
                return
            (self.tenant.resume if state == "on" else self.tenant.pause)()

    def start(self):
        (self.tenant.resume if self.items[0][1] == "on" else self.tenant.pause)()  # before the first request
        self._thread.start()
        return self

    def wait_to_end(self, halt, deadline_s=None):
        """Block until the schedule's last item has run its seconds (or the trial's deadline, or halt): a trial
        whose requests end early still observes every phase of the co-tenant's schedule."""
        end = self.length_s if deadline_s is None else min(self.length_s, deadline_s)
        halt.wait(max(0.0, self.t0 + end - time.monotonic()))

    def stop(self):
        self._stop.set()
        self._thread.join()


def run_trial(cfg: RunConfig, client, prompts, sink, trial: int, stop, probe, tenant, on_record) -> None:
    """Run one trial of the cell under a progress bar and print its summary line; ``on_record`` gets the trial's
    record (counts, wall time, cgroup counter deltas, the co-tenant's throughput) once it ends, finished or not."""
    from tqdm import tqdm
    times = send_times(cfg, trial)
    with tqdm(total=len(times), disable=cfg.quiet, file=sys.stderr, unit="req",
              desc=f"{cfg.config} c={cfg.concurrency} trial {trial}") as bar:
        t = Trial(cfg, client, prompts, sink, trial, stop, bar, times)
        t.tenant = tenant
        before = probe.counters()
        record = {"trial": trial, "started_at": datetime.now(timezone.utc).isoformat(),
                  "run_index": cfg.run_index, "complete": False, "requests": len(times)}
        t.t0 = wall0 = time.monotonic()  # one clock origin for the rows and the timeline
        sampler = make_timeline(cfg, trial, t.t0, t.state)
        tenant_rate = cotenant.ThroughputSampler(tenant, t0=t.t0) if tenant is not None else None
        schedule = (Schedule(cfg.antagonist_schedule, tenant, t.t0).start()
                    if tenant is not None and cfg.antagonist_schedule else None)
        probe_start = tenant.probe_records()[1] if tenant is not None else 0
        t._probe_at = probe_start   # the timeline, like the summary, starts at this trial's first record
        sampler.start()
        if tenant_rate is not None:
            tenant_rate.start()
        try:
            t.run()
            if schedule is not None:
                schedule.wait_to_end(t.halt, cfg.deadline_s)
            record["complete"] = True
        finally:
            sampler.stop()
            wall = time.monotonic() - wall0
            if schedule is not None:
                schedule.stop()
            if tenant_rate is not None:
                record["cotenant"] = cotenant_summary(tenant_rate.stop())
                if tenant.probe_spec:
                    records = tenant.probe_records(probe_start)[0]
                    record["cotenant"].update(probe_phases(records, t.t0, cfg.antagonist_schedule))
                    # the per-period samples behind those summaries, beside the cell (cell_files.probe_path)
                    from llm_psi.load.cell_files import probe_path
                    from llm_psi.load.probe import write_samples
                    write_samples(probe_path(cfg.stem), records, t.t0, trial)
            after = probe.counters()
            record.update(wall_s=wall, peak_in_flight=t.peak_in_flight, counts=dict(t.counts), deadline_hit=t.cut,
                          cgroup_delta=counter_delta(before, after))
            on_record(record)
    print(_summary_line(cfg, trial, cfg.output, wall, t.peak_in_flight), file=sys.stderr)
