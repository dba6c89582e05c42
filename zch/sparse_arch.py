"""From raw 64-bit IDs to embedding rows, three ways, in front of a TorchRec EmbeddingBagCollection.

Production IDs are hashes from an unbounded space, and new ones arrive every day. A table has a fixed
number of rows, so something must map IDs to rows:

- ``modulo``: ``raw % rows``, the usual answer. Unrelated IDs share a row, and their gradients mix.
- ``zch``: zero-collision hashing with TorchRec's ``ManagedCollisionCollection`` of MCH modules
  (``MCHManagedCollisionModule``). Each *admitted* ID owns a row; when the table is full the eviction
  policy (LRU: least recently seen; LFU: least often seen) decides who keeps one. IDs not admitted
  (yet) share the table's last row, its default row.
- ``full``: one row per ID from a vocabulary of every ID, the unhashed upper bound. It needs every ID
  up front, which is exactly what production cannot have.

MPZCH (TorchRec's multi-probe ``HashZchManagedCollisionModule``) is not offered: FBGEMM's CPU kernel
for it only does read-only lookups (``zero_collision_hash`` raises "Expected readonly to be true" when
asked to insert), so it cannot train here, and a CUDA path that was never run would be a guess.

Distributed runs: TorchRec shards managed-collision modules only row-wise, which needs CUDA, so on CPU
the remapper is *replicated*: every rank profiles the whole global batch (all-gathered IDs) and so makes
the same admissions and evictions, while the embedding tables themselves are sharded table-wise by
``DistributedModelParallel``. Each rank then remaps only its own batch.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.mc_modules import (
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHManagedCollisionModule,
)

VARIANTS = ("full", "modulo", "zch_lru", "zch_lfu")
_MASK63 = np.uint64((1 << 63) - 1)


def salted_raw_ids(ids: np.ndarray, salt: int) -> np.ndarray:
    """Dense IDs -> raw 63-bit IDs, as production sees them: splitmix64 of ``ids + salt``, a bijection
    on 64 bits, shifted to 63 so every value is a non-negative int64 below int64's maximum (which MCH
    uses as its empty-slot marker). Distinct inputs stay distinct except with probability ~n^2/2^64."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps around, as splitmix64 intends
        x = np.asarray(ids, dtype=np.uint64) + np.uint64(salt) * np.uint64(0xD1B54A32D192ED03)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return ((x >> np.uint64(1)) & _MASK63).astype(np.int64)


class Remapper(nn.Module):
    """Maps each feature's raw IDs to rows of its table. ``tables``: {feature: rows}, one table per
    feature (named after it). Subclasses implement ``rows``; ``forward`` applies it to a KJT."""

    kind = ""

    def __init__(self, tables: dict[str, int]) -> None:
        super().__init__()
        self.tables = dict(tables)

    def rows(self, feature: str, raw: torch.Tensor) -> torch.Tensor:
        """The row each raw ID maps to now, without learning anything from them."""
        raise NotImplementedError

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        parts = [self.rows(key, kjt[key].values()) for key in kjt.keys()]
        return KeyedJaggedTensor(keys=kjt.keys(), values=torch.cat(parts), lengths=kjt.lengths(), stride=kjt.stride())

    def pop_reassigned(self) -> dict[str, torch.Tensor]:
        """Rows handed to a different ID since the last call ({feature: rows}); their embeddings
        should be re-initialized. Only ZCH reassigns rows."""
        return {}

    @property
    def evictions(self) -> int:
        return 0


class ModuloRemapper(Remapper):
    kind = "modulo"

    def rows(self, feature: str, raw: torch.Tensor) -> torch.Tensor:
        return torch.remainder(raw, self.tables[feature])


class VocabularyRemapper(Remapper):
    """One row per ID of a vocabulary known up front (the unhashed model); any other ID gets the
    table's last row, reserved for unknown IDs."""

    kind = "full"

    def __init__(self, vocabularies: dict[str, np.ndarray]) -> None:
        sorted_ids = {f: np.unique(v) for f, v in vocabularies.items()}
        super().__init__({f: len(ids) + 1 for f, ids in sorted_ids.items()})
        for feature, ids in sorted_ids.items():
            self.register_buffer(f"vocab_{feature}", torch.as_tensor(ids, dtype=torch.int64))

    def rows(self, feature: str, raw: torch.Tensor) -> torch.Tensor:
        vocab = getattr(self, f"vocab_{feature}")
        pos = torch.searchsorted(vocab, raw).clamp(max=len(vocab) - 1)
        return torch.where(vocab[pos] == raw, pos, torch.full_like(pos, len(vocab)))


class ManagedCollisionRemapper(Remapper):
    """TorchRec's MCH zero-collision hashing. ``policy``: "lru" or "lfu". ``eviction_interval``:
    admissions and evictions happen every that many training batches (1: every batch, so a new ID
    gets its own row in the batch it first appears, if the policy admits it)."""

    kind = "zch"

    def __init__(self, tables: dict[str, int], policy: str = "lru", eviction_interval: int = 1) -> None:
        super().__init__(tables)
        if policy not in ("lru", "lfu"):
            raise ValueError(f"eviction policy must be 'lru' or 'lfu', got {policy!r}")
        self.kind = f"zch_{policy}"
        configs = [
            EmbeddingBagConfig(name=f, embedding_dim=1, num_embeddings=n, feature_names=[f]) for f, n in tables.items()
        ]
        self.mcc = ManagedCollisionCollection(
            managed_collision_modules={
                f: MCHManagedCollisionModule(
                    zch_size=n,
                    device=torch.device("cpu"),
                    eviction_interval=eviction_interval,
                    eviction_policy=LRU_EvictionPolicy() if policy == "lru" else LFU_EvictionPolicy(),
                    name=f,
                )
                for f, n in tables.items()
            },
            embedding_configs=configs,
        )
        # IDs that lost their row to another, over the module's life (saved with the model).
        self.register_buffer("eviction_count", torch.zeros(len(tables), dtype=torch.int64))
        self._reassigned: dict[str, list[torch.Tensor]] = {f: [] for f in tables}

    def _module(self, feature: str) -> MCHManagedCollisionModule:
        return self.mcc._managed_collision_modules[feature]

    def rows(self, feature: str, raw: torch.Tensor) -> torch.Tensor:
        jt = self._module(feature).remap({feature: _jagged(raw)})
        return jt[feature].values()

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
        if not self.training:
            with _eval(self.mcc):
                return self.mcc(kjt)
        world = dist.get_world_size() if dist.is_initialized() else 1
        global_batch = _all_gather_kjt(kjt) if world > 1 else kjt
        before = {f: int(self._module(f).open_slots().item()) for f in self.tables}
        out = self.mcc(global_batch)  # profile (admit, evict) on the global batch, then remap it
        for i, (feature, rows) in enumerate(self.mcc.evict().items()):
            if rows is None:
                continue
            filled = before[feature] - int(self._module(feature).open_slots().item())
            self.eviction_count[i] += rows.numel() - filled  # admitted minus empty slots used
            self._reassigned[feature].append(rows)
        if world == 1:
            return out
        with _eval(self.mcc):  # the same mapping, applied to this rank's batch only
            return self.mcc(kjt)

    def mapping_digest(self) -> str:
        """SHA-256 of the ID-to-row mapping of every table (which raw ID holds which row)."""
        h = hashlib.sha256()
        for feature in self.tables:
            m = self._module(feature)
            for t in (m._mch_sorted_raw_ids, m._mch_remapped_ids_mapping):
                h.update(t.detach().cpu().numpy().tobytes())
        return h.hexdigest()

    def check_replicas(self) -> None:
        """Raise if the ranks' mappings differ (they must not: every rank profiles the same global
        batches). A no-op in a single process."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return
        digests: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(digests, self.mapping_digest())
        if len(set(digests)) != 1:
            raise RuntimeError(
                f"ZCH mappings differ between ranks ({digests}); the replicated remapper must see "
                "the same global batches on every rank"
            )

    def pop_reassigned(self) -> dict[str, torch.Tensor]:
        out = {f: torch.unique(torch.cat(r)) for f, r in self._reassigned.items() if r}
        self._reassigned = {f: [] for f in self.tables}
        return out

    @property
    def evictions(self) -> int:
        return int(self.eviction_count.sum().item())


def build_remapper(
    variant: str, tables: dict[str, int], vocabularies: dict[str, np.ndarray] | None = None, eviction_interval: int = 1
) -> Remapper:
    """``variant``: one of :data:`VARIANTS`. ``tables``: {feature: rows} (ignored by ``full``, which
    sizes its tables from ``vocabularies``)."""
    if variant == "modulo":
        return ModuloRemapper(tables)
    if variant == "full":
        if vocabularies is None:
            raise ValueError("the full (unhashed) variant needs every feature's vocabulary of raw IDs")
        return VocabularyRemapper(vocabularies)
    if variant in ("zch_lru", "zch_lfu"):
        return ManagedCollisionRemapper(tables, policy=variant.split("_")[1], eviction_interval=eviction_interval)
    if variant == "mpzch":
        raise ValueError(
            "mpzch is not available: FBGEMM's CPU zero_collision_hash kernel only does read-only "
            "lookups, so MPZCH cannot train on CPU (see zch/README.md); use zch_lru or zch_lfu"
        )
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


class RemappedModel(nn.Module):
    """``model(dense, remapper(kjt))``: any TorchRec model whose sparse input is a KJT of rows (here
    torchrec's DLRM), fed raw IDs through a remapper. DistributedModelParallel shards the model's
    tables and leaves the remapper (buffers, no parameters) on every rank."""

    def __init__(self, remapper: Remapper, model: nn.Module) -> None:
        super().__init__()
        self.remapper = remapper
        self.model = model

    def forward(self, dense: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.model(dense, self.remapper(kjt))


def collision_report(
    remapper: Remapper, feature: str, active: np.ndarray, history: np.ndarray, frequent_share: float = 0.1
) -> dict[str, float]:
    """How ``remapper`` maps the IDs ``active`` (one entry per lookup, e.g. the test window's) of
    ``feature``: the share of distinct active IDs whose row is shared with another active ID; the
    same among the ``frequent_share`` of them most frequent in ``history`` (the training lookups),
    the IDs a model most needs to tell apart; the share of active lookups landing on a shared row;
    and the share of active IDs never seen in ``history``."""
    ids, counts = np.unique(active, return_counts=True)
    rows = remapper.rows(feature, torch.as_tensor(ids)).numpy()
    shared = np.bincount(rows)[rows] > 1
    seen_ids, seen_counts = np.unique(history, return_counts=True)
    pos = np.searchsorted(seen_ids, ids).clip(max=len(seen_ids) - 1)
    past = np.where(seen_ids[pos] == ids, seen_counts[pos], 0)
    top = np.argsort(-past, kind="stable")[: max(1, int(round(frequent_share * len(ids))))]
    return {
        "active_ids": int(len(ids)),
        "collision_rate": float(shared.mean()),
        "collision_rate_frequent": float(shared[top].mean()),
        "lookups_on_shared_rows": float(counts[shared].sum() / counts.sum()),
        "unseen_in_history": float((past == 0).mean()),
    }


def _jagged(values: torch.Tensor):
    from torchrec import JaggedTensor

    return JaggedTensor(values=values, lengths=torch.ones_like(values))


@contextlib.contextmanager
def _eval(module: nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode (MCH then remaps without profiling), restoring its mode after."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _all_gather_kjt(kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """Every rank's IDs in one KJT, each rank's part of a feature as one row: all MCH needs to profile."""
    world = dist.get_world_size()
    counts = torch.tensor(kjt.length_per_key(), dtype=torch.int64)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    width = int(max(c.sum() for c in all_counts))
    padded = torch.zeros(width, dtype=kjt.values().dtype)
    padded[: kjt.values().numel()] = kjt.values()
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    values, lengths = [], []
    for k in range(len(kjt.keys())):
        for rank in range(world):
            start = int(all_counts[rank][:k].sum())
            n = int(all_counts[rank][k])
            values.append(gathered[rank][start : start + n])
            lengths.append(n)
    return KeyedJaggedTensor(keys=kjt.keys(), values=torch.cat(values), lengths=torch.tensor(lengths), stride=world)
