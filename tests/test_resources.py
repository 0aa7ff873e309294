"""The memory a run may use (ofe.resources): read from the machine, compared against a need."""

import pytest
import torch

from ofe import resources
from ofe.data.synthetic import from_spec
from ofe.run_config import build_train_config
from ofe.train.build import TrainError, check_memory
from ofe.train.distributed import DistEnv


def test_available_memory_is_a_positive_byte_count_below_physical_memory():
    room = resources.available_memory("cpu")
    assert room is not None and 0 < room
    import os
    assert room <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_too_big_compares_against_the_available_bytes(monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda device="cpu": 3 * resources.GIB)
    assert resources.too_big(3 * resources.GIB) is None
    message = resources.too_big(4 * resources.GIB)
    assert message == "needs ~4 GiB, more than the 3 GiB available on cpu"
    monkeypatch.setattr(resources, "available_memory", lambda device="cpu": None)
    assert resources.too_big(1e30) is None  # unknown: nothing refused


def test_a_run_is_refused_when_its_estimate_exceeds_the_room(monkeypatch):
    """The default tiny run fits; with 1 MiB of room its estimate (activations alone are more) does not."""
    import ofe.train.build as build
    cfg = build_train_config({"preset": "tiny", "batch_size": 4})
    env = DistEnv(rank=0, world_size=1, device=torch.device("cpu"))
    check_memory(cfg, env)
    monkeypatch.setattr(build, "too_big", lambda need, device: "needs more" if need > 2**20 else None)
    with pytest.raises(TrainError, match="parameters, batch 4 x 32. needs more; lower --model.d_model"):
        check_memory(cfg, env)


def test_cpu_processes_of_one_machine_share_its_memory(monkeypatch):
    """Under torchrun on the CPU every process of the machine needs its share: the check counts them all."""
    import ofe.train.build as build
    from ofe.train.estimate import GIB, estimate
    cfg = build_train_config({"preset": "tiny", "batch_size": 4})
    env = DistEnv(rank=0, world_size=4, device=torch.device("cpu"))
    one = estimate(cfg, 4)["memory_gib"]["total"] * GIB
    asked = []
    monkeypatch.setattr(build, "too_big", lambda need, device: asked.append(need))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    check_memory(cfg, env)
    assert asked == [pytest.approx(4 * one)]


def test_a_generated_corpus_beyond_memory_is_refused(monkeypatch):
    assert from_spec("bigram-backcopy:docs=2") is not None
    monkeypatch.setattr("ofe.data.synthetic.too_big", lambda need: f"needs {need:.0f} bytes")
    with pytest.raises(ValueError, match=r"8,192 symbols needs 196608 bytes; lower docs or length"):
        from_spec("bigram-backcopy:docs=2")
