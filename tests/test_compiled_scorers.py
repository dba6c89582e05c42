"""BERT4Rec's and SASRec's scorers compiled with AOTInductor (``python -m inference_legacy.aot_compile
EXPORT``): the padded form they compile equals the model's own, the compiled scorer serves the same
scores and top items as the eager one, and an altered or foreign package falls back to the eager
model with the reason logged."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from bert4rec.scorer import NextItemScorer
from bert4rec.sequences import sequences_kjt
from inference_legacy.aot_compile import main as compile_main

# sequential models trained and compiled with AOTInductor: the slow tier (make test, CI)
pytestmark = pytest.mark.slow


@pytest.fixture(params=["bert4rec_run", "sasrec_run"])
def export(request, tmp_path):
    """A copy of a seeded tiny run's export (the session's), to compile and damage."""
    _, out = request.getfixturevalue(request.param)
    dst = tmp_path / "export"
    shutil.copytree(out / "export", dst)
    return dst


def test_the_padded_form_scores_like_the_model(export) -> None:
    scorer = NextItemScorer(export, compiled=False)
    tokens, lengths = scorer.check_inputs()
    seqs = [t[:n].numpy() for t, n in zip(tokens, lengths)]
    assert min(len(s) for s in seqs) == 1 and max(len(s) for s in seqs) == scorer.model.max_len
    with torch.no_grad():
        padded = scorer.model.padded_scores(tokens, lengths)
        own = scorer.model.last_scores(sequences_kjt(seqs))
    assert float((padded - own).abs().max()) < 1e-4


def test_the_compiled_scorer_serves_the_same_scores_and_falls_back_with_the_reason(
    export, ml100k_split, caplog
) -> None:
    entry = compile_main([str(export)])[str(export)]
    assert entry["file"] == "scorer.aoti.pt2" and entry["check_rows"] == 64
    assert entry["max_abs_diff"] <= entry["tolerance"] <= 1e-4
    assert entry["one"]["file"] == "scorer_one.aoti.pt2" and entry["one"]["check_rows"] == 1
    compiled, eager = NextItemScorer(export), NextItemScorer(export, compiled=False)
    assert compiled.runtime == "AOTInductor" and eager.runtime == "eager"
    assert compiled.compiled_one is not None and eager.compiled_one is None
    indptr, hist = ml100k_split.history("test")
    histories = [hist[indptr[u] : indptr[u + 1]] for u in range(300)]
    histories[0] = histories[0][:0]  # an empty history: [MASK] / [BOS] alone
    got, want = compiled.score_indices(histories), eager.score_indices(histories)
    assert got.shape == want.shape == (300, compiled.model.num_items)
    assert np.abs(got - want).max() <= entry["tolerance"] + 1e-4
    top = lambda s: np.argsort(-s, axis=1, kind="stable")[:, :10]  # noqa: E731
    assert (top(got) == top(want)).mean() > 0.99  # only near-ties may swap
    # one user alone: the one-sequence program, at any width (an empty history, one item, longer than max_len)
    for h in (histories[0], histories[5][:1], histories[5][:7], np.resize(histories[5], compiled.model.max_len + 9)):
        one = compiled.score_indices([h])
        assert one.shape == (1, compiled.model.num_items)
        assert np.abs(one - eager.score_indices([h])).max() <= entry["one"]["tolerance"] + 1e-4
        pair = compiled.score_indices([h, h])  # the batch program
        assert np.abs(one[0] - pair[0]).max() <= 1e-4
    with pytest.raises(ValueError, match="tokens must lie in"):
        compiled.compiled(torch.full((2, 3), 10**6), torch.tensor([3, 3]))

    caplog.set_level("INFO", logger="common.compiled")
    m = json.loads((export / "manifest.json").read_text())
    m["compiled"]["machine"] = "riscv64"
    (export / "manifest.json").write_text(json.dumps(m))
    foreign = NextItemScorer(export)
    assert (
        foreign.compiled is None and foreign.compiled_one is None and "compiled for machine riscv64" in foreign.runtime
    )
    assert any("compiled for machine riscv64" in r.getMessage() for r in caplog.records)
    assert np.array_equal(foreign.score_indices(histories), want)


def test_a_compiled_program_that_does_not_match_its_model_is_not_written(tmp_path) -> None:
    from torch.export import Dim

    from inference_legacy.compiler import compile_program, export_program

    torch.manual_seed(0)
    model, x = torch.nn.Linear(4, 2).eval(), torch.randn(8, 4)
    program = export_program(model, (x,), {"input": {0: Dim("batch", min=2, max=1024)}})
    with pytest.raises(RuntimeError, match=r"1\.00e\+00 from the exported model's .* m\.pt2 not written"):
        compile_program(program, (x,), tmp_path / "m.pt2", lambda *a: None, lambda t: model(t) + 1, (x,))
    assert list(tmp_path.iterdir()) == []
