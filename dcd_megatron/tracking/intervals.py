"""The one rule for every `*_interval` setting (console lines, plots, validation, checkpoints)."""


def due(step: int, interval: int, last: int = 0) -> bool:
    """True every `interval` steps (0 = never) and at step `last` (0 = no last-step rule); never at step 0."""
    return interval > 0 and step > 0 and (step % interval == 0 or step == last)
