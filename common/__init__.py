"""The thin shared package: what every stage would otherwise copy.

- ``runtime``: process group, device and backend, seeding, rank-0 printing, results.json, local launches.
- ``checkpoint``: DCP save / load / resume that survives a crash and changes of world size.
- ``metrics``: the shared ranking protocol (HR, NDCG, Recall with bootstrap CIs) and AUC / NE.
- ``features``: a declarative feature schema and the one converter to ``KeyedJaggedTensor``.
- ``data``: MovieLens, Criteo and synthetic interaction data, and the shared split.
"""
