"""The memory a training stage needs in each process, said before it starts: weight-sized copies
times the bytes of one fp32 copy, divided by the shards each network is split into. It is the
arithmetic `benchmarks/memory.py` checks against measured peaks; activations come on top and are
not estimated (they depend on the network, the batch and gradient checkpointing)."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class MemoryPlan:
    copies: dict[str, float]  # what a process holds, in fp32 weight-sized copies
    copy_bytes: int  # one fp32 copy of the network
    shards: int  # ways each network is split (1: whole copies)
    read_whole: bool = False  # the teacher is read whole before it is sharded

    @property
    def count(self) -> float:
        return sum(self.copies.values())

    def per_process(self) -> int:
        """Bytes of the copies per process (the whole teacher read at the start on top)."""
        return int(self.count * self.copy_bytes) // self.shards + self.read_whole * self.copy_bytes

    def describe(self) -> str:
        split = f" / {self.shards} shards" if self.shards > 1 else ""
        whole = ""
        if self.read_whole:
            whole = f", + the teacher read whole at the start ({size(self.copy_bytes)})"
        held = ", ".join(f"{n:g} {what}" if n != 1 else what for what, n in self.copies.items())
        return (
            f"memory per process: {self.count:g} weight copies x {size(self.copy_bytes)}{split} "
            f"= {size(int(self.count * self.copy_bytes) // self.shards)}{whole}, plus "
            f"activations ({held})"
        )


def size(n: float) -> str:
    return f"{n / GIB:,.2f} GiB" if n >= GIB else f"{n / 2**20:,.1f} MiB"
