"""/v1/pipelines: chains of compression jobs, each stage taking the model of the one before it."""
