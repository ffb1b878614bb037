from longserve.errors import LongserveError

__version__ = "0.1.0"
__all__ = ["LongserveError", "__version__"]
