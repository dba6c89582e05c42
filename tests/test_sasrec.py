"""SASRec on real ml-100k: the model is causal, its task predicts every next item, a seeded tiny
run learns, its export scores awkward histories in a defined way, and a ranker can be trained on its
candidates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


def test_the_model_is_causal_and_the_task_predicts_each_next_item() -> None:
    from bert4rec.sequences import sequences_kjt
    from sasrec.model import SASRec, shift_batch

    torch.manual_seed(0)
    model = SASRec(num_items=30, max_len=8, dim=16, num_layers=2, num_heads=2, dropout=0.0).eval()
    a, b = np.array([1, 2, 3, 4, 5]), np.array([1, 2, 3, 9, 7])  # the same first three items
    with torch.no_grad():
        h = model.hidden(sequences_kjt([a, b]))
    assert torch.allclose(h[0, :3], h[1, :3], atol=1e-6)  # no position sees a later token
    assert not torch.allclose(h[0, 3], h[1, 3], atol=1e-3)
    seq, rows, cols, labels = shift_batch([np.array([5, 6, 7]), np.array([8, 9])], model.bos_token)
    assert seq.values().tolist() == [model.bos_token, 5, 6, model.bos_token, 8]
    assert rows.tolist() == [0, 0, 0, 1, 1] and cols.tolist() == [0, 1, 2, 0, 1]
    assert labels.tolist() == [4, 5, 6, 7, 8]  # item index = token - 1
    # the query for a history is [BOS] + its last max_len - 1 items, as in training
    (q,) = model.query_sequences([np.arange(20)])
    assert q.tolist() == [model.bos_token, *range(14, 21)]
    assert model.query_sequences([np.array([], dtype=np.int64)])[0].tolist() == [model.bos_token]


def test_a_seeded_tiny_run_learns(sasrec_run) -> None:
    res, _ = sasrec_run
    before = res["valid_before_training"]["NDCG@10"]
    best = max(v["NDCG@10"] for v in res["valid_per_eval"])
    assert best > 10 * before and best > 0.07, (before, best)
    assert res["valid"]["full"]["NDCG@10"] == pytest.approx(best)  # the best model is the one tested
    assert res["test"]["full"]["num_users"] == 943


def test_the_rank_shares_training_windows_are_the_whole_splits(ml100k, ml100k_split) -> None:
    from bert4rec.bert4rec_main import training_windows
    from common.data.split import rank_splits

    whole = training_windows(ml100k_split, 50, 10)
    for world in (2, 3):
        shares = [training_windows(rank_splits(ml100k, r, world)[0], 50, 10) for r in range(world)]
        assert min(map(len, shares)) > 0.9 * len(whole) / world
        together = [w for share in shares for w in share]
        assert len(together) == len(whole) and all(np.array_equal(a, b) for a, b in zip(together, whole))


@pytest.mark.multiprocess
def test_two_ranks_train_on_their_shares_and_evaluate_the_sample(sasrec_run, ml100k, tmp_path) -> None:
    """torchrun with 2 ranks (the loop BERT4Rec shares, bert4rec/bert4rec_main.py), each training on its
    share of the users, evaluating a fixed sample of 300: every training window is used once, the
    popularity figures are exactly one process's on that sample (counted over both shares), and
    SASRec beats them."""
    from common.baselines import popularity_report
    from common.data.split import split_dataset
    from tests.conftest import SASREC_TINY, torchrun

    torchrun("sasrec.sasrec_main", SASREC_TINY + ["--eval-users", "300", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["world_size"] == 2 and res["num_windows"] == sasrec_run[0]["num_windows"]
    pop = popularity_report(split_dataset(ml100k, eval_users=300), "test", n_boot=20)
    assert res["test_popularity"]["num_users"] == res["test"]["sampled_popularity"]["num_users"] == 300
    assert all(res["test_popularity"][k] == v for k, v in pop.means.items())
    assert res["test"]["full"]["NDCG@10"] > pop.means["NDCG@10"] + 0.02  # seed 0: 0.093 against 0.056


def test_export_scores_awkward_histories(sasrec_run, ml100k, ml100k_split) -> None:
    from bert4rec.scorer import NextItemScorer

    _, out = sasrec_run
    scorer = NextItemScorer(out / "export")
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    assert scorer.name == "sasrec"
    known = [int(i) for i in manifest["item_raw_ids"][:3]]
    scored = scorer.score([[], known[:1], known, [known[0], 999_999_999, known[1]], [999_999_999]])
    assert scored.scores.shape == (5, manifest["num_items"]) and np.isfinite(scored.scores).all()
    assert scored.unknown == [[], [], [], [999_999_999], [999_999_999]]
    assert np.allclose(scored.scores[3], scorer.score([[known[0], known[1]]]).scores[0], atol=1e-4)
    assert np.allclose(scored.scores[4], scored.scores[0], atol=1e-4)  # all unknown = empty = [BOS]
    never_trained = int(ml100k.item_raw_ids[np.flatnonzero(ml100k_split.item_counts("valid") == 0)[0]])
    cold = scorer.score([[never_trained], known[:1] + [never_trained]])
    assert cold.unknown == [[], []] and np.isfinite(cold.scores).all()
    top = scorer.recommend(known, k=10)
    assert len(top) == 10 and not set(known) & {i for i, _ in top}


@pytest.mark.slow  # SASRec, then a ranker trained on its candidates: a chain
def test_a_ranker_trained_on_sasrec_candidates_re_ranks_sasrec_order(sasrec_run, sasrec_reranking_run) -> None:
    """The ranker learns the source it re-ranks: its candidates in evaluation are SASRec's top 100 in
    SASRec's order (the order's NDCG@10 is SASRec's own), and it learned (validation AUC). Whether
    it improves on that order is measured, not asserted: at 3 seeds it does not (sasrec/README.md)."""
    res, _ = sasrec_reranking_run
    assert res["candidate_source"] == "SASRec"
    assert res["valid_candidates_order"]["NDCG@10"] == pytest.approx(sasrec_run[0]["valid"]["full"]["NDCG@10"])
    assert res["dlrm"]["valid_per_epoch"][-1]["auc"] > 0.7


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_the_sampled_softmax_is_the_full_one_over_the_drawn_items(name: str) -> None:
    """--sampled-softmax N: each position's target against N uniform draws (a draw equal to the
    target masked), the same logits the full head gives those items; 0 is the full cross-entropy."""
    import torch.nn.functional as F

    from bert4rec.bert4rec_main import SequenceTrain
    from bert4rec.scorer import make_model
    from bert4rec.sequences import sequences_kjt

    torch.manual_seed(0)
    settings = {"max_len": 8, "embedding_dim": 16, "num_layers": 1, "num_heads": 1, "dropout": 0.0}
    net = make_model(name, settings, 40).eval()
    seq = sequences_kjt([np.array([1, 2, 3, 4]), np.array([5, 6])])
    rows, cols, labels = torch.tensor([0, 0, 1]), torch.tensor([1, 3, 1]), torch.tensor([2, 7, 30])
    full = net.head(net.hidden(seq)[rows, cols])
    assert torch.allclose(SequenceTrain(net)(seq, rows, cols, labels), F.cross_entropy(full, labels))
    torch.manual_seed(1)
    loss = SequenceTrain(net, sampled=12)(seq, rows, cols, labels)
    torch.manual_seed(1)
    negatives = torch.randint(40, (12,))
    neg = full[:, negatives].masked_fill(negatives[None, :] == labels[:, None], -torch.inf)
    want = F.cross_entropy(
        torch.cat([full[torch.arange(3), labels][:, None], neg], 1), torch.zeros(3, dtype=torch.int64)
    )
    assert torch.allclose(loss, want, atol=1e-6) and loss.requires_grad


def test_the_popularity_sampled_softmax_subtracts_log_q() -> None:
    import torch.nn.functional as F

    from bert4rec.bert4rec_main import SequenceTrain
    from bert4rec.scorer import make_model
    from bert4rec.sequences import sequences_kjt

    torch.manual_seed(0)
    settings = {"max_len": 8, "embedding_dim": 16, "num_layers": 1, "num_heads": 1, "dropout": 0.0}
    net = make_model("sasrec", settings, 40).eval()
    seq = sequences_kjt([np.array([1, 2, 3, 4]), np.array([5, 6])])
    rows, cols, labels = torch.tensor([0, 0, 1]), torch.tensor([1, 3, 1]), torch.tensor([2, 7, 30])
    counts = np.arange(40) % 7
    full = net.head(net.hidden(seq)[rows, cols])
    train = SequenceTrain(net, sampled=12, counts=counts)
    torch.manual_seed(3)
    loss = train(seq, rows, cols, labels)
    torch.manual_seed(3)
    q = torch.as_tensor((counts + 1.0) / (counts + 1.0).sum()).float()
    negatives = torch.multinomial(q, 12, replacement=True)
    pos = full[torch.arange(3), labels] - torch.log(q[labels] * 12)
    neg = (full[:, negatives] - torch.log(q[negatives] * 12)).masked_fill(
        negatives[None, :] == labels[:, None], -torch.inf
    )
    want = F.cross_entropy(torch.cat([pos[:, None], neg], 1), torch.zeros(3, dtype=torch.int64))
    assert torch.allclose(loss, want, atol=1e-5)
