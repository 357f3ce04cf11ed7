"""Control: pressure sources and triggers, the paper's gate, the concurrency limit, the adaptive limit.

The public API of pressure (PSI files, stall share, triggers, detectors, the probe) and gate (the admission
controllers) is re-exported here; the psi_admission.py command is control.psi, the adaptive limit control.adaptive.
"""
from llm_psi.control.gate import Admission, Decision, Gate, Limit
from llm_psi.control.pressure import (MIN_DELTA_S, PSI_FIX, TRIGGER_WINDOW_S, Detector, PressureFile, PressureProbe,
                                      PsiUnavailable, StallShare, TriggerMonitor, TriggerUnavailable, cell_probe,
                                      make_detector, parse_pressure, stall_share)

__all__ = ["Admission", "Decision", "Gate", "Limit", "MIN_DELTA_S", "PSI_FIX", "TRIGGER_WINDOW_S", "Detector",
           "PressureFile", "PressureProbe", "PsiUnavailable", "StallShare", "TriggerMonitor", "TriggerUnavailable",
           "cell_probe", "make_detector", "parse_pressure", "stall_share"]
