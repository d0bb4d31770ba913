"""Artifact store: produce once, never trust a half-written artifact, one producer under concurrency."""
import json
import multiprocessing as mp
import subprocess
import sys
import textwrap

import pytest
import torch
from hydra import compose, initialize_config_dir

from experiments import build as B
from experiments import pipeline as P
from helpers import ROOT
from experiments.store import ArtifactStore, config_key


def write_model(tmp):
    (tmp / "model.pt").write_bytes(b"weights")
    return {"note": "made"}


def test_key_is_order_independent_and_sensitive_to_values():
    assert config_key({"a": 1, "b": {"c": 2}}) == config_key({"b": {"c": 2}, "a": 1})
    assert config_key({"a": 1}) != config_key({"a": 2})


def test_second_request_loads_without_producing(tmp_path):
    store = ArtifactStore(tmp_path)
    calls = []

    def produce(tmp):
        calls.append(1)
        return write_model(tmp)

    path, marker, created = store.get_or_create("backdoor", "k1", produce)
    assert created and (path / "model.pt").read_bytes() == b"weights" and marker["meta"] == {"note": "made"}
    path2, _, created2 = store.get_or_create("backdoor", "k1", produce)
    assert not created2 and path2 == path and len(calls) == 1


def test_corrupt_artifact_is_rebuilt(tmp_path):
    store = ArtifactStore(tmp_path)
    path, _, _ = store.get_or_create("backdoor", "k", write_model)
    (path / "model.pt").write_bytes(b"truncated")
    assert store.load("backdoor", "k") is None
    _, _, created = store.get_or_create("backdoor", "k", write_model)
    assert created and (path / "model.pt").read_bytes() == b"weights"


def test_failed_producer_leaves_nothing(tmp_path):
    store = ArtifactStore(tmp_path)

    def crash(tmp):
        (tmp / "model.pt").write_bytes(b"half")
        raise RuntimeError("out of memory")

    try:
        store.get_or_create("backdoor", "k", crash)
    except RuntimeError:
        pass
    assert store.load("backdoor", "k") is None
    assert not store.path("backdoor", "k").exists() and not any((tmp_path / "tmp").iterdir())


def test_killed_job_leaves_no_artifact_a_rerun_would_trust(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from experiments.store import ArtifactStore
        def produce(tmp):
            (tmp / "model.pt").write_bytes(b"half-written")
            os._exit(9)   # killed mid-write: no exception handler runs
        ArtifactStore({str(tmp_path)!r}).get_or_create("backdoor", "k", produce)
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    store = ArtifactStore(tmp_path)
    assert store.load("backdoor", "k") is None
    _, _, created = store.get_or_create("backdoor", "k", write_model)
    assert created and not list((tmp_path / "tmp").iterdir())  # the stale temp dir was cleaned


def _race(root, counter_file):
    def produce(tmp):
        with open(counter_file, "a") as fh:
            fh.write("trained\n")
        import time
        time.sleep(0.5)
        return write_model(tmp)

    ArtifactStore(root).get_or_create("backdoor", "shared", produce)


def test_concurrent_jobs_produce_once(tmp_path):
    counter = tmp_path / "count.txt"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "store"), str(counter))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    assert counter.read_text().count("trained") == 1
    marker = json.loads((tmp_path / "store" / "backdoor" / "shared" / "COMPLETE.json").read_text())
    assert set(marker["files"]) == {"model.pt"}


@pytest.mark.parametrize("attack", ["ssba", "inputaware", "lf", "trojan"])
def test_the_progress_switch_never_changes_the_backdoored_models_key(attack, tmp_path):
    """progress=false (sweeps) and progress=true (interactive runs) must share one stored model."""
    keys, configs = set(), []
    for progress in ("true", "false"):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"attack={attack}", "dataset=synthetic",
                                                           f"progress={progress}", f"paths.data_dir={tmp_path}"])
        assert cfg.attack.progress is (progress == "true")  # the attack's own bars follow the job's switch
        data = B.load_data(B.build_source(cfg))
        keys.add(config_key(P.backdoor_material(cfg, data, "fp32", 1, torch.device("cpu"))))
        configs.append(P.result_config(cfg))
    assert len(keys) == 1
    assert configs[0] == configs[1]  # a rerun with the other switch is the same job, not "a different config"
