"""Stage 1: two-tower retrieval. See retrieval/README.md."""
