"""The stages of a DisBack run: record, backtrack, sample (and the demo that chains them)."""
