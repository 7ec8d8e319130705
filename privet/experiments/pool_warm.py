"""Imported by the process pool's fork server only (experiments/process_backend.py), before
any worker is forked: matplotlib's pyplot (Agg), so that a worker can draw the run's plot
(common.plots.draw) in ~0.15 s where the driver would first spend ~0.7 s importing it. The
fork server's imports overlap the driver's own start, on the other core."""

from privet.common import plots

plots._pyplot()
