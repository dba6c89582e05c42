"""Data sets and the shared split. See each module's docstring."""

from common.data.dataset import Feature, InteractionData
from common.data.load import add_dataset_args, load_dataset
from common.data.split import Split, leave_last_out, split_dataset

__all__ = ["Feature", "InteractionData", "Split", "add_dataset_args", "leave_last_out", "load_dataset", "split_dataset"]
