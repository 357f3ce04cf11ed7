"""metrics.py: the one definition of every latency metric."""
import math

import numpy as np
import pandas as pd

import metrics


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
