"""Data sets and the shared split. See each module's docstring."""

from common.data.movielens import MovieLens, load_movielens
from common.data.split import Split, leave_last_out

__all__ = ["MovieLens", "Split", "leave_last_out", "load_movielens"]
