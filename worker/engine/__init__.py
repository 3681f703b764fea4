"""The compression engine: a pure library (torch, torchvision, torch-pruning, onnx).

It never imports FastAPI, Celery or SQLAlchemy. `config`, `errors` and `ingest` are also free of
torch so that the API can validate specs and datasets without loading it.
"""
