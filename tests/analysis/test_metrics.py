"""metrics.py: the one definition of every latency metric."""
import math

import numpy as np
import pandas as pd
import pytest

from llm_psi.analysis import metrics


def rows():
    return pd.DataFrame([
        dict(status="ok", output_tokens=5, t_submit_s=0.0, t_dequeue_s=0.5, t_admit_s=1.5, t_start_s=1.75,
             t_first_token_s=2.0, t_end_s=4.0),
        dict(status="rejected", output_tokens=0, t_submit_s=0.1, t_dequeue_s=0.2, t_admit_s=5.2,
             t_start_s=None, t_first_token_s=None, t_end_s=None),
    ])


def test_derive_spans():
    d = metrics.derive(rows()).iloc[0]
    assert d.queue_ms == 500 and d.defer_ms == 1000 and d.sched_ms == 250
    assert d.service_ms == 2250 and d.ttft_ms == 2000 and d.e2e_ms == 4000
    assert d.tpot_ms == 500  # 2 s over 4 tokens after the first


def test_rejected_rows_give_nan_not_zero():
    d = metrics.derive(rows()).iloc[1]
    assert d.defer_ms == 5000
    assert math.isnan(d.e2e_ms) and math.isnan(d.service_ms) and math.isnan(d.tpot_ms)


def test_summarize_counts_and_excludes_rejected():
    s = metrics.summarize(rows())
    assert (s["n_ok"], s["n_rejected"], s["n_failed"], s["n"]) == (1, 1, 0, 2)
    assert s["p95_e2e_ms"] == 4000 and s["mean_defer_ms"] == 1000


def test_percentile_is_numpy_linear():
    v = np.arange(1, 21, dtype=float)
    assert metrics.percentile(v, 95) == np.percentile(v, 95) == 19.05
    assert math.isnan(metrics.percentile([], 95))


def test_single_token_has_no_tpot():
    df = rows().iloc[:1].assign(output_tokens=1)
    assert math.isnan(metrics.derive(df).tpot_ms.iloc[0])


def test_min_samples_for():
    assert metrics.min_samples_for(95) == 59
    assert metrics.min_samples_for(50) == 5


def open_loop_rows():
    """Five sent requests of one trial with known answers. Lateness 0, 125, 200, 100, 100 ms; span 0 to 4 s.
    ok: e2e 1000/3375/1200, ttft 300/500/1000 (500 exactly: binary fractions); the failed row's timings would meet any SLO here."""
    nan = float("nan")
    return pd.DataFrame([
        dict(trial=1, status="ok", output_tokens=5, t_intended_s=0.0, t_submit_s=0.0, t_dequeue_s=0.0,
             t_admit_s=0.0, t_start_s=0.1, t_first_token_s=0.3, t_end_s=1.0),
        dict(trial=1, status="ok", output_tokens=5, t_intended_s=0.5, t_submit_s=0.625, t_dequeue_s=0.625,
             t_admit_s=0.625, t_start_s=0.75, t_first_token_s=1.125, t_end_s=4.0),
        dict(trial=1, status="ok", output_tokens=5, t_intended_s=1.0, t_submit_s=1.2, t_dequeue_s=1.2,
             t_admit_s=1.2, t_start_s=1.3, t_first_token_s=2.2, t_end_s=2.4),
        dict(trial=1, status="rejected", output_tokens=0, t_intended_s=1.5, t_submit_s=1.6, t_dequeue_s=1.6,
             t_admit_s=nan, t_start_s=nan, t_first_token_s=nan, t_end_s=nan),
        dict(trial=1, status="failed", output_tokens=5, t_intended_s=2.0, t_submit_s=2.1, t_dequeue_s=2.1,
             t_admit_s=2.1, t_start_s=2.1, t_first_token_s=2.2, t_end_s=2.3),
    ])


def test_lateness_is_submit_minus_intended():
    d = metrics.derive(open_loop_rows())
    assert list(d.lateness_ms) == pytest.approx([0, 125, 200, 100, 100])
    assert metrics.derive(rows()).lateness_ms.isna().all()  # no t_intended_s column: NaN, not 0


def test_summarize_lateness_over_every_sent_request():
    s = metrics.summarize(open_loop_rows())
    assert s["p50_lateness_ms"] == pytest.approx(100)
    assert s["p95_lateness_ms"] == pytest.approx(185)  # linear between 125 and 200 (rank 3.8 of 0-4)
    assert s["max_lateness_ms"] == pytest.approx(200)  # an ok request
    df = open_loop_rows()
    df.loc[3, "t_submit_s"] = 2.5  # the rejected request, sent 1 s late, counts
    assert metrics.summarize(df)["max_lateness_ms"] == pytest.approx(1000)
    df.loc[4, "t_submit_s"] = 3.5  # and so does the failed one, 1.5 s late
    assert metrics.summarize(df)["max_lateness_ms"] == pytest.approx(1500)


def test_summarize_has_no_lateness_without_intended_times():
    assert "p50_lateness_ms" not in metrics.summarize(rows())
    empty = rows().assign(t_intended_s=[None, ""])  # a closed-loop run with the column, empty
    assert not any("lateness" in k for k in metrics.summarize(empty))


def test_summarize_keeps_every_existing_key_and_adds_throughput():  # n_cut: --deadline-s
    s = metrics.summarize(rows())
    assert [k for k in s if k != "throughput_rps"] == (
        ["n_ok", "n_rejected", "n_failed", "n_cut", "n"] + [f"{p}_{m}" for m in metrics.METRICS
                                                  for p in ("p50", "p95", "p99", "mean")])
    assert s["throughput_rps"] == pytest.approx(1 / 4.0)  # one ok request; first submit 0, last end 4
    assert "slo_met" not in s and "goodput_rps" not in s


def test_span_over_all_rows_of_one_trial():
    assert metrics.span_s(open_loop_rows()) == pytest.approx(4.0)
    df = open_loop_rows()
    df.loc[4, "t_end_s"] = 5.0  # a failed request that ends last still ends the span
    assert metrics.span_s(df) == pytest.approx(5.0)
    assert math.isnan(metrics.span_s(df.assign(trial=[1, 1, 2, 2, 2])))  # two clocks: no span
    assert math.isnan(metrics.span_s(df.assign(t_end_s=float("nan"))))
    assert math.isnan(metrics.span_s(df.iloc[:1].assign(t_end_s=0.0)))  # zero span
    assert math.isnan(metrics.summarize(df.assign(trial=[1, 1, 2, 2, 2]))["throughput_rps"])


def test_goodput_counts_only_ok_requests_meeting_every_bound():
    df = open_loop_rows()
    g = metrics.goodput(df, {"ttft_ms": 500, "e2e_ms": 2000})  # only the first ok request
    assert g == {"slo_met": 1, "goodput_rps": pytest.approx(0.25), "throughput_rps": pytest.approx(0.75)}
    g = metrics.goodput(df, {"e2e_ms": 5000})  # every ok request; not the failed one, nor the rejected one
    assert (g["slo_met"], g["goodput_rps"]) == (3, pytest.approx(0.75))
    g = metrics.goodput(df, {"ttft_ms": 500})  # the bound itself meets it
    assert g["slo_met"] == 2
    assert metrics.goodput(df, {"queue_ms": 1})["slo_met"] == 3
    assert metrics.goodput(df, {})["slo_met"] == 3


def test_missing_metric_does_not_meet_its_bound():
    one_token = open_loop_rows().assign(output_tokens=1)  # tpot undefined
    assert metrics.goodput(one_token, {"tpot_ms": 1e9})["slo_met"] == 0


def test_goodput_rejects_unknown_metric():
    with pytest.raises(ValueError, match="ttft"):
        metrics.goodput(open_loop_rows(), {"ttft": 500})


def test_summarize_with_slo_from_parse_slo():
    from llm_psi.load import arrivals
    s = metrics.summarize(open_loop_rows(), slo=arrivals.parse_slo("ttft:500,e2e:2000"))
    assert (s["n_ok"], s["n_rejected"], s["n_failed"]) == (3, 1, 1)
    assert s["slo_met"] == 1 and s["goodput_rps"] == pytest.approx(0.25)
    assert s["throughput_rps"] == pytest.approx(0.75)


def test_request_seed_one_formula():
    assert metrics.request_seed(0, 0, 7) == 7
    assert metrics.request_seed(2, 3, 5) == 2 * 1_000_003 + 3 * 10_007 + 5  # 2_030_032
    assert metrics.request_seed(2, 3, 5) == 2_030_032
    assert metrics.schedule_seed(2, 3) == 2_000_009
    seeds = {metrics.request_seed(1, t, r) for t in range(3) for r in range(100)}
    assert len(seeds) == 300  # every request of a run its own seed


def test_deferred_scalar_and_elementwise():
    assert metrics.deferred(2, "admitted") and metrics.deferred(1, "admitted_after_timeout")
    assert not metrics.deferred(1, "admitted") and not metrics.deferred(0, "none") and not metrics.deferred(1, "rejected")
    checks = pd.Series([1, 3, 1, float("nan"), 2])
    decision = pd.Series(["admitted", "admitted", "admitted_after_timeout", "none", "rejected"])
    assert metrics.deferred(checks, decision).tolist() == [False, True, True, False, True]


def test_request_spans_from_offsets():
    s = metrics.request_spans(10.0, t_admit=10.5, t_start=11.0, t_first_token=11.25, t_end=13.0)
    assert s == {"deferral_s": 0.5, "queue_s": 0.5, "ttft_s": 1.25, "service_s": 2.0, "e2e_s": 3.0}
    rejected = metrics.request_spans(10.0, t_end=10.25)
    assert rejected == {"deferral_s": None, "queue_s": None, "ttft_s": None, "service_s": None, "e2e_s": 0.25}


def test_derive_row_matches_derive():
    row = {"t_intended_s": 0.5, "t_submit_s": 1.0, "t_dequeue_s": 1.5, "t_admit_s": 2.0, "t_start_s": 2.25,
           "t_first_token_s": 2.5, "t_end_s": 4.5, "output_tokens": 5, "status": "ok"}
    d = metrics.derive_row(row)
    assert d == {"queue_ms": 500.0, "defer_ms": 500.0, "sched_ms": 250.0, "service_ms": 2250.0, "ttft_ms": 1500.0,
                 "e2e_ms": 3500.0, "tpot_ms": 500.0, "lateness_ms": 500.0}
    frame = metrics.derive(pd.DataFrame([row])).iloc[0]
    assert all(frame[k] == v for k, v in d.items())
    rejected = metrics.derive_row({"t_submit_s": 1.0, "t_dequeue_s": 1.0, "t_end_s": 1.5, "output_tokens": None,
                                   "t_intended_s": ""})
    assert rejected["e2e_ms"] == 500.0 and rejected["queue_ms"] == 0.0
    assert all(math.isnan(rejected[k]) for k in ("defer_ms", "service_ms", "ttft_ms", "tpot_ms", "lateness_ms"))
    assert math.isnan(metrics.derive_row({**row, "output_tokens": 1})["tpot_ms"])  # one token: no decode step
