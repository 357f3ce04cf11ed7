"""Analysis: metrics over raw per-request timestamps, trial statistics, tables, figures and the pdf. It reads
files only: nothing here imports the service, the engines or the load."""
