"""One module per verb: orchestration only; the deciding is done by pure modules."""
