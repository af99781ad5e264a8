"""What disback writes and reads on disk: run directories, manifests, state, atomic IO, locks."""
