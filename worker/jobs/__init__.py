"""One module per job kind (registered with worker.jobs.base.job_kind), plus what they share: base.py (the
contract with the runner and the registry), inputs.py (loading) and measure.py (measuring)."""
