"""What every resumable training stage shares."""

from __future__ import annotations

import torch

from disback_cli.errors import DisbackError


def check_finite(
    iteration: int, directory, state, any_rank=lambda bad: bad, **values: torch.Tensor
) -> None:
    """Stop a run whose loss or gradient norm is NaN or infinite, before anything is saved.

    One device-to-host sync per call; the message names the run's latest resume point `state`
    (in `directory`), which stays intact; `any_rank` makes all processes of a data-parallel run
    stop together."""
    flags = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    if not any_rank(not bool(torch.isfinite(flags).all())):
        return
    shown = ", ".join(f"{k} {v.item():.4g}" for k, v in values.items())
    last_good = (
        "no checkpoint had been saved yet"
        if state is None
        else f"last good checkpoint {directory / state.file} (iteration {state.step}) is intact"
    )
    raise DisbackError(
        f"diverged at iteration {iteration} ({shown}); nothing from it was saved; {last_good}; "
        "lower the learning rate or set --grad-clip and restart with --force"
    )
