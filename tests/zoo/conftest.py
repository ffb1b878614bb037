"""The fake zoo of `tests/test_zoo.py` (a tiny GGUF over three fake wheels), shared with these tests."""

from tests.test_zoo import fake_zoo, home, tiny_gguf  # noqa: F401 (fixtures)
