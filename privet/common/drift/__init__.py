"""Data that arrives over time: windowed sources with scheduled drift (streams), the
monitoring signals clients release with DP (signals), drift detectors (detect), retraining
policies (policy) and the per-window privacy plan (accounting)."""
