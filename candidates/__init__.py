"""Candidate sources: every way the project proposes items for a user, behind one interface
(candidates/sources.py). The ranker's training (golden_training/) and the served pipeline
(integration/) both ask the stages' exports for candidates through it."""
