from tests.harness import service_factory  # noqa: F401 - the fixture, for this folder
