"""Train SASRec on MovieLens with full cross-entropy and a sharded item embedding, and evaluate
it under the project's protocol.

    python -m sasrec.sasrec_main                                      # ml-100k, early stopping: a few minutes on 2 CPU cores
    torchrun --nproc_per_node=2 -m sasrec.sasrec_main
    python -m sasrec.sasrec_main --epochs 5 --eval-every 1            # smoke run

A causal transformer over each user's ordered history (model.py) predicts the next item at every
position, with cross-entropy over the whole catalog (Klenitskiy & Vasilev, RecSys 2023: SASRec
trained this way beats BERT4Rec). The item embedding lives in a TorchRec ``EmbeddingCollection``
sharded by DistributedModelParallel and updated by a fused RowWiseAdagrad in backward; the
transformer is data-parallel, with Adam. Training windows are the last ``--max-len`` items of each
user's training sequence plus earlier windows every ``--window-step`` items.

The loop, evaluation, checkpoints and export are BERT4Rec's (bert4rec/bert4rec_main.py): validation every
``--eval-every`` epochs with early stopping, DCP checkpoints under <out>/checkpoints (``--resume``),
the best model under <out>/best, test scored once with it (``--no-test``: never), results in
<out>/results.json and the next-item scorer for the integration pipeline in <out>/export.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bert4rec.bert4rec_main import SeqConfig, check_config, parser, train_and_evaluate
from sasrec.model import shift_batch


@dataclass(frozen=True)
class Config(SeqConfig):
    max_len: int = 50
    window_step: int = 10
    num_heads: int = 1
    dropout: float = 0.5
    batch_size: int = 64
    sparse_lr: float = 0.05
    dense_lr: float = 1e-3
    eval_every: int = 2
    patience: int = 4
    out: str = "runs/sasrec"


def parse_args(argv: list[str] | None = None) -> Config:
    p, _ = parser(Config(), __doc__)
    return check_config(p, Config(**vars(p.parse_args(argv))))


def training_batch(cfg: Config, windows: list[np.ndarray], rng: np.random.Generator, net) -> tuple:
    """Next-item prediction at every position of a step's windows (model.py)."""
    return shift_batch(windows, net.bos_token)


def main(argv: list[str] | None = None) -> dict[str, object]:
    return train_and_evaluate("sasrec", "SASRec", parse_args(argv), training_batch)


if __name__ == "__main__":
    main()
