"""What disback writes and reads on disk: run directories, manifests, state, sample sets, atomic
IO, bounded readers and locks. The ground floor: it knows files, not teachers, networks, methods
or metrics, and imports nothing above `config`."""
