"""The autotuner: schedule spaces with constraint pruning (space), a cost model (cost), search
strategies (strategies), isolated measurement (harness, sandbox, ops), tune() (tuner), shape suites
(suites) and the offline strategy benchmark (replay).

Imports only kernels, torch, triton, numpy and the standard library (optuna lazily, for 'tpe').
Nothing is imported here, so a spawned measurement worker loads only what it needs.
"""
