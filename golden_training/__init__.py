"""Stage 2 training: DLRM ranking. See golden_training/README.md."""
