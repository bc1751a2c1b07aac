"""Training scalars read back from a run's TensorBoard event files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Curves:
    """Logged scalars: ``series[tag] = (steps, values)``, read from TensorBoard event files."""

    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)


def read_scalars(folder: Path) -> Curves:
    """Every scalar of the event files in ``folder`` (none if it has no events). A file still
    being written ends at its last complete record."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.glob("events.out.tfevents.*")):
        return Curves()
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
    acc.Reload()
    curves = Curves()
    for tag in sorted(acc.Tags().get("scalars", [])):
        events = acc.Scalars(tag)
        curves.series[tag] = ([e.step for e in events], [e.value for e in events])
    return curves
