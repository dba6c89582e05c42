"""The thin shared package: what every stage would otherwise copy.

- ``runtime``: process group, device and backend, seeding, rank-0 printing, results.json, local launches.
- ``checkpoint``: DCP save / load / resume that survives a crash and changes of world size.
- ``flags``: the flags every training script shares, declared once.
- ``sharding``: TorchRec's planner, DistributedModelParallel, fused and dense optimizers, train pipeline.
- ``metrics``: the shared ranking protocol (HR, NDCG, Recall with bootstrap CIs, ``top_unseen``) and AUC / NE.
- ``features``: a declarative feature schema and the one converter to ``KeyedJaggedTensor``.
- ``data``: the canonical data form, MovieLens and interaction logs of one's own, and the shared split.
"""
