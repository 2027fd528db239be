"""Orchestration: the experiment queue (experiments.yaml), what runs left on disk, and the runner."""
