"""Stage 2 inference: batched DLRM scoring. See prediction/README.md."""
