"""Helping a user choose a spec: the LR range test on real data and the rule-based recommender."""
