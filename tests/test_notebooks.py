"""The sharding notebooks: they run top to bottom from a fresh kernel, and the outputs committed with
them are the ones the current code produces. Plus the two helpers they stand on (sharding/parity.py,
sharding/planning.py), checked directly."""

from __future__ import annotations

import nbformat
import pytest

from sharding import parity
from sharding.execute import NOTEBOOKS, execute
from sharding.planning import meta_ebc, plan, topology


def _results(nb: nbformat.NotebookNode) -> list[str | None]:
    """Each code cell's displayed value (text/plain of its execute_result), None where it has none.
    Streams are left out: they hold wall-clock timings."""
    out = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            shown = [o for o in cell.get("outputs", []) if o.get("output_type") == "execute_result"]
            out.append(shown[0]["data"].get("text/plain") if shown else None)
    return out


@pytest.mark.notebook
@pytest.mark.multiprocess
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_from_a_fresh_kernel_and_matches_its_committed_outputs(path):
    committed = nbformat.read(path, as_version=4)
    code_cells = [c for c in committed.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") and c.get("outputs") for c in code_cells), (
        f"{path.name} is committed without outputs in some cells: run `make notebooks`"
    )

    fresh = execute(path, write=False)  # raises CellExecutionError naming the failing cell

    errors = [o for c in fresh.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    stale = [i for i, (old, new) in enumerate(zip(_results(committed), _results(fresh))) if old != new]
    assert not stale, (
        f"{path.name}: the committed outputs of code cells {stale} differ from a fresh run: "
        "run `make notebooks` and commit the result"
    )


def test_parity_check_is_exact_and_can_fail(monkeypatch):
    """One process, table-wise: the copied weights give exactly the unsharded output; without the
    copy (the sharded tables keep their own initialization) the check reports a difference."""
    report = parity.compare_with_unsharded("table_wise")
    assert report.max_abs_diff == 0.0
    assert report.table_bytes == sum(rows * dim * 4 for _, rows, dim in parity.TABLES)
    assert sorted(report.output_keys) == sorted(name for name, _, _ in parity.TABLES)

    monkeypatch.setattr(parity, "copy_into_shards", lambda sharded, full: None)
    assert parity.compare_with_unsharded("table_wise").max_abs_diff > 1e-3


def test_cuda_only_sharding_is_refused_on_cpu_with_the_reason():
    with pytest.raises(ValueError, match="need CUDA in TorchRec"):
        parity.run("row_wise", nproc=2, device="cpu")


@pytest.mark.parametrize(
    "sharding_type, hosts", [("row_wise", 1), ("table_row_wise", 2), ("grid_shard", 2), ("column_wise", 1)]
)
def test_plan_on_a_simulated_gpu_topology_covers_every_table_once(sharding_type, hosts):
    from torchrec.distributed.planner.types import ParameterConstraints

    world = 4
    report = plan(
        meta_ebc(list(parity.TABLES)),
        topology(world, "cuda", local_world_size=world // hosts),
        {name: ParameterConstraints(sharding_types=[sharding_type], min_partition=32) for name, _, _ in parity.TABLES},
    )
    for name, rows, dim in parity.TABLES:
        shards = report.plan.plan[""][name].sharding_spec.shards
        assert sum(s.shard_sizes[0] * s.shard_sizes[1] for s in shards) == rows * dim
        assert {s.placement.rank() for s in shards} <= set(range(world))
    assert set(report.shards["sharding_type"]) == {sharding_type}
    assert report.ranks["total_ms"].max() == pytest.approx(report.step_ms)
    # every rank's totals are the sum of its shards
    assert report.ranks["hbm_gb"].sum() == pytest.approx(report.shards["hbm_gb"].sum())


def test_fp16_tables_halve_the_planned_weights():
    tables = [("user", 1_000_000, 128), ("item", 500_000, 128)]
    fp32 = plan(meta_ebc(tables), topology(2, "cuda", hbm_gb=80))
    fp16 = plan(meta_ebc(tables, data_type="fp16"), topology(2, "cuda", hbm_gb=80))
    # storage = weights + per-shard buffers that do not depend on the table's precision
    assert fp16.shards["hbm_gb"].sum() < 0.55 * fp32.shards["hbm_gb"].sum()
