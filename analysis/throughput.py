"""How fast long jobs ran on this machine, so the next run can say how long it will take.

A long job reports progress in units the user understands (windows, heads, candidates). When it
finishes, its seconds per unit are stored in the disk cache under the model (fingerprint and dtype,
``LoadedModel.cache_key()``), the job's name and this machine (kind ``throughput``); an estimate
for a later run of the same job is that measured rate times the later run's units. Nothing is a
constant: a job that never ran on this model and machine has no estimate, and the page says so.

The machine is part of the key because the cache travels (a cache filled on a GPU box is read on a
laptop): a rate measured elsewhere says nothing about here.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass

from analysis.cache import DiskCache

KIND = "throughput"
MEMORY = 0.5  # weight of the newest run in the stored rate: recent runs count most, one outlier does not rule


@dataclass(frozen=True)
class Rate:
    """Measured speed of one job on one model and machine."""

    job: str
    unit: str
    seconds_per_unit: float
    runs: int
    last_units: int  # the size of the newest run, for jobs whose size is known only once they run

    def seconds(self, units: int) -> float:
        return self.seconds_per_unit * units


def machine() -> str:
    """What identifies this machine's speed: architecture, processor and core count."""
    return f"{platform.machine()}|{platform.processor() or 'cpu'}|{os.cpu_count()} cores"


def _parts(model: dict[str, str], job: str, device: str) -> dict[str, str]:
    return {**model, "job": job, "machine": machine(), "device": device}


def measured_rate(cache: DiskCache, model: dict[str, str], job: str, device: str = "cpu") -> Rate | None:
    """The stored rate of ``job`` on this model, machine and device; None if it never ran here."""
    value = cache.get_json(KIND, _parts(model, job, device))
    return Rate(**value) if value else None


def record(
    cache: DiskCache, model: dict[str, str], job: str, unit: str, units: int, seconds: float, device: str = "cpu"
) -> Rate:
    """Fold one finished run (``units`` done in ``seconds``) into the stored rate and return it."""
    if units < 1 or seconds < 0:
        raise ValueError(f"a finished run has at least one unit and a non-negative time, got {units}, {seconds}")
    rate = seconds / units
    old = measured_rate(cache, model, job, device)
    if old is not None:
        rate = MEMORY * rate + (1 - MEMORY) * old.seconds_per_unit
    new = Rate(job=job, unit=unit, seconds_per_unit=rate, runs=(old.runs if old else 0) + 1, last_units=units)
    cache.put_json(KIND, _parts(model, job, device), asdict(new))
    return new


def duration_text(seconds: float) -> str:
    """``seconds`` as a person reads a duration: '8 s', '2 min 05 s', '1 h 03 min'."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
