"""Run services that every entry point shares (the training loop, the PPO driver and its workers, the
evaluation verbs): logging, seeding and RNG state, stop requests, the metrics writer and progress bar,
the local cache, and the hooks tests use to stop a run at a known point.

Nothing here knows about models, data or DeepSpeed.
"""
