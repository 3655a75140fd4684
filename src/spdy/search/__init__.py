"""From a timing table and a database to a profile: the exact DP solver, the SPDY search, the
evolutionary search and the baselines, each scoring candidates with an `Evaluator`."""
