"""Train BERT4Rec on MovieLens with a sharded item embedding, and evaluate it honestly.

    python -m bert4rec.bert4rec_main                                   # ml-100k, about 10 minutes on 2 CPU cores
    torchrun --nproc_per_node=2 -m bert4rec.bert4rec_main
    python -m bert4rec.bert4rec_main --epochs 5 --eval-every 1         # smoke run

The item embedding lives in a TorchRec ``EmbeddingCollection`` sharded by
DistributedModelParallel (table-wise by default) and updated by a fused RowWiseAdagrad in
backward, which runs on CPU as well as CUDA; the transformer is data-parallel, with Adam. Data
and split are the shared ones (common/data): each user's last item is test, the one before it
validation, the rest training, in time order. Training windows are the last ``--max-len`` items
of each user's training sequence plus earlier windows every ``--window-step`` items, with the
cloze task of model.py.

Evaluation, on validation every ``--eval-every`` epochs and on test once with the best model
(``--no-test``: validation only, test never scored):
- the shared full-ranking protocol (HR@10, NDCG@10, Recall@50/100 over every item, history
  excluded), each user counted exactly once whatever the number of ranks;
- the popularity-sampled-100 and uniform-sampled-100 protocols, to compare with papers and
  TorchRec's example (they are easier: read them as such).
Early stopping on validation NDCG@10 (``--patience`` evaluations). Checkpoints (DCP) under
<out>/checkpoints (``--resume`` continues) and the best model under <out>/best; results in
<out>/results.json; the next-item scorer for the integration pipeline in <out>/export.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bert4rec.model import mask_batch
from common.sequential import SeqConfig, check_config, parser, train_and_evaluate


@dataclass(frozen=True)
class Config(SeqConfig):
    max_len: int = 50
    window_step: int = 10
    mask_prob: float = 0.4
    last_prob: float = 0.1
    out: str = "runs/bert4rec"


def parse_args(argv: list[str] | None = None) -> Config:
    d = Config()
    p, groups = parser(d, __doc__)
    train = groups["training"]
    train.add_argument(
        "--mask-prob",
        type=float,
        default=d.mask_prob,
        help=f"share of tokens masked in the cloze task (default: {d.mask_prob})",
    )
    train.add_argument(
        "--last-prob",
        type=float,
        default=d.last_prob,
        help=f"share of sequences with only the last item masked (default: {d.last_prob})",
    )
    return check_config(p, Config(**vars(p.parse_args(argv))))


def training_batch(cfg: Config, windows: list[np.ndarray], rng: np.random.Generator, net) -> tuple:
    """The cloze task (model.py) on a step's windows."""
    return mask_batch(windows, cfg.mask_prob, cfg.last_prob, net.mask_token, rng)


def main(argv: list[str] | None = None) -> dict[str, object]:
    return train_and_evaluate("bert4rec", "BERT4Rec", parse_args(argv), training_batch)


if __name__ == "__main__":
    main()
