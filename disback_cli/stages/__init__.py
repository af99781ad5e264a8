"""What each command runs: record, backtrack, sample, evaluate, doctor (and the demo that chains
them), with the resumable-run lifecycle the training stages share."""
