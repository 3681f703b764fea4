"""One module per job kind: turn a job's spec into engine calls and output files."""
