"""Data sets and the shared split. See each module's docstring."""

from common.data.movielens import MovieLens, add_dataset_args, load_movielens
from common.data.split import Split, leave_last_out, split_dataset

__all__ = ["MovieLens", "Split", "add_dataset_args", "leave_last_out", "load_movielens", "split_dataset"]
