"""The allocator setting (allocator.reuse_freed_memory): a freed volume-sized block is reused without
page faults on glibc, the user's own glibc variables win, and every registration asks for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from RigidResNetRegistrationLib import allocator

ROOT = Path(__file__).resolve().parents[1]

# a fresh interpreter: optionally set the thresholds, then allocate and free a 64 MB tensor and
# allocate a 48 MB one (torch, as the engine; numpy asks for huge pages, which fault fewer times;
# a smaller block, as an aligned request of the same size does not fit the freed one), every page
# written, counting the page faults of the second allocation
_FAULTS = """
import json, resource, sys
import torch
from RigidResNetRegistrationLib import allocator
applied = allocator.reuse_freed_memory() if sys.argv[1] == "tune" else None
block = torch.ones(16_000_000); del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = torch.ones(12_000_000)
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in allocator.GLIBC_VARIABLES}
    environ.update(env, PYTHONPATH=str(ROOT / "RigidResNetRegistration"))
    run = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, timeout=120, env=environ)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def _huge_pages_always() -> bool:
    """Transparent huge pages for every anonymous mapping: a fresh 48 MB block then faults about
    24 times, not 11,719, and the counts below cannot show the difference."""
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not allocator.uses_glibc(), reason="the setting applies to glibc's malloc (Linux) only")
def test_a_freed_volume_sized_block_is_reused_without_page_faults_once_set() -> None:
    untuned, tuned = _faults("keep"), _faults("tune")
    assert tuned["applied"] is True
    assert tuned["faults"] < 500, tuned
    # 48 MB is 11,719 pages of 4 KB: without the setting, each is faulted in again
    assert untuned["faults"] > (tuned["faults"] if _huge_pages_always() else 5_000), untuned


@pytest.mark.skipif(not allocator.uses_glibc(), reason="the setting applies to glibc's malloc (Linux) only")
def test_the_users_own_glibc_threshold_variables_are_respected() -> None:
    # a trim threshold alone (glibc's mmap threshold left adaptive) would not stop the faults either way;
    # what matters is that the call changes nothing and says so
    kept = _faults("tune", MALLOC_TRIM_THRESHOLD_="131072")
    assert kept["applied"] is False
    if not _huge_pages_always():
        assert kept["faults"] > 5_000, kept


def test_nothing_is_changed_without_glibc(monkeypatch) -> None:
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.uses_glibc() is False
    monkeypatch.setattr(allocator, "uses_glibc", lambda: False)
    assert allocator._set_thresholds(allocator.REUSE_BYTES, allocator.KEEP_FREE_BYTES) is False


def test_every_registration_asks_for_it(monkeypatch) -> None:
    from conftest import ConstantPredictor, phantom_volume

    from RigidResNetRegistrationLib import engine
    from RigidResNetRegistrationLib.model import ModelCard

    card = ModelCard.from_dict({"name": "constant", "transform": "rigid", "input": {"size": [48, 48], "spacing_mm": 2.0}})
    calls = []
    monkeypatch.setattr(engine, "reuse_freed_memory", lambda: calls.append(1) or True)
    fixed = phantom_volume()
    engine.register_volumes(fixed, fixed, ConstantPredictor(card, [0.0, 0.0, 0.0]), engine.RegistrationOptions(refine=False, compute_registered=False,
                                                                                           compute_difference=False))
    assert calls == [1]
