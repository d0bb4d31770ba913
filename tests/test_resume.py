"""Training checkpoints: a killed training resumes from its last checkpoint and ends with the weights of an
uninterrupted run; the loop's other hooks (per-step learning rates, early stop, after-step projection)."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from bdcore.data import DatasetSpec
from bdcore.datasets import make_synthetic
from bdcore.models import PreActResNet18
from bdcore.train import EpochCheckpoint, TrainingHooks, TrainSettings, train_model
from attacks.wanet import WaNet
from helpers import ROOT, run_cli

SPEC = DatasetSpec("synthetic", 4, 3, 32, 32, (0.5,) * 3, (0.25,) * 3)
CPU = torch.device("cpu")
SETTINGS = TrainSettings(epochs=4, batch_size=32, t_max=4)


class Killed(Exception):
    """Stands for the process dying mid-epoch (the subprocess test below uses a real SIGKILL)."""


def weights(model):
    return [v.clone() for v in model.state_dict().values()]


def train(hooks_factory, checkpoint=None, settings=SETTINGS):
    data, _ = make_synthetic(num_classes=4, size=32, train_per_class=32, test_per_class=8, seed=0)
    torch.manual_seed(0)
    model = PreActResNet18(4, 3, width=4)
    history = train_model(model, data, SPEC, settings, device=CPU, seed=0, hooks=hooks_factory(model),
                          progress=False, checkpoint=checkpoint)
    return model, history


def dying_at(epoch_to_die, base_factory):
    """The same hooks, but the batch transform dies in the first batch of `epoch_to_die`."""
    def factory(model):
        hooks = base_factory(model)
        inner = hooks.batch_transform or (lambda x, y, epoch: (x, y))

        def batch_transform(x, y, epoch):
            if epoch == epoch_to_die:
                raise Killed
            return inner(x, y, epoch)
        hooks.batch_transform = batch_transform
        return hooks
    return factory


def plain_resumable(model):
    return TrainingHooks(resumable_state=lambda: {}, load_resumable_state=lambda state: None)


def wanet_hooks(model):
    return WaNet(SPEC, seed=3, cross_ratio=2.0).training_hooks(model, CPU)


@pytest.mark.parametrize("hooks_factory", [plain_resumable, wanet_hooks], ids=["plain", "wanet"])
def test_a_killed_training_resumes_to_the_uninterrupted_weights(tmp_path, hooks_factory):
    reference, ref_history = train(hooks_factory)
    checkpoint = EpochCheckpoint(tmp_path / "ckpt.pt", every=1)
    with pytest.raises(Killed):
        train(dying_at(2, hooks_factory), checkpoint)
    assert torch.load(checkpoint.path, weights_only=True)["epoch"] == 2
    resumed, history = train(hooks_factory, checkpoint)
    assert [row.get("resumed", False) for row in history] == [True, True, False, False]
    assert [row["loss"] for row in history] == [row["loss"] for row in ref_history]
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed), weights(reference)))


def test_checkpoint_every_n_epochs_and_none_after_the_last(tmp_path):
    saved = []
    checkpoint = EpochCheckpoint(tmp_path / "ckpt.pt", every=2)
    original = checkpoint.save
    checkpoint.save = lambda state: (saved.append(state["epoch"]), original(state))
    train(plain_resumable, checkpoint, TrainSettings(epochs=5, batch_size=32, t_max=5))
    assert saved == [2, 4]


def test_an_unreadable_checkpoint_is_ignored_and_training_starts_afresh(tmp_path):
    reference, _ = train(plain_resumable)
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"not a checkpoint")
    model, history = train(plain_resumable, EpochCheckpoint(path))
    assert not any(row.get("resumed") for row in history)
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(reference)))


def test_hooks_without_resumable_state_are_never_checkpointed(tmp_path):
    checkpoint = EpochCheckpoint(tmp_path / "ckpt.pt")
    train(lambda model: TrainingHooks(batch_transform=lambda x, y, epoch: (x, y)), checkpoint)
    assert not checkpoint.path.exists()


def test_per_step_learning_rates_replace_the_schedule_and_must_not_run_out():
    steps = 4 * (128 // 32)
    rates = [0.01 * (k + 1) / steps for k in range(steps)]
    seen = []

    def record(model):
        return TrainingHooks(learning_rates=rates, before_optimizer_step=lambda m, again: None,
                             after_optimizer_step=lambda m: seen.append(None))
    _, history = train(record, settings=TrainSettings(epochs=4, batch_size=32, scheduler="constant"))
    assert [row["lr"] for row in history] == [rates[k * 4 + 3] for k in range(4)]
    assert len(seen) == steps  # after_optimizer_step runs once per step
    with pytest.raises(RuntimeError, match="exhausted at step 5"):
        train(lambda model: TrainingHooks(learning_rates=rates[:4]),
              settings=TrainSettings(epochs=4, batch_size=32, scheduler="constant"))


def test_on_epoch_end_returning_true_stops_after_that_epoch():
    _, history = train(lambda model: TrainingHooks(on_epoch_end=lambda epoch: epoch == 1))
    assert [row["epoch"] for row in history] == [0, 1]


def test_checkpoint_every_must_be_positive():
    with pytest.raises(ValueError, match="checkpoint_every=0"):
        EpochCheckpoint("x.pt", every=0)
    result = run_cli(["dataset=synthetic", "model.width=4", "progress=false", "checkpoint_every=0"], timeout=120)
    assert result.returncode != 0
    assert "checkpoint_every=0 is invalid" in result.stderr and "Traceback" not in result.stderr


def backdoor_job(store, out, epochs):
    return [sys.executable, "run.py", "dataset=synthetic", "model.width=4", "progress=false", "threads=1",
            "defense=none", f"train.epochs={epochs}", f"train.t_max={epochs}", f"paths.store_dir={store}",
            f"hydra.run.dir={out}"]


@pytest.mark.slow
def test_sigkill_mid_training_then_rerun_gives_the_uninterrupted_model(tmp_path):
    """A real SIGKILL while the backdoored model trains; the rerun resumes and stores the same weights."""
    epochs = 12
    env = {"WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"}
    subprocess.run(backdoor_job(tmp_path / "ref_store", tmp_path / "ref", epochs), cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    store = tmp_path / "store"
    job = subprocess.Popen(backdoor_job(store, tmp_path / "killed", epochs), cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = store / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and job.poll() is None and not any(checkpoints.glob("backdoor-*.pt")):
        time.sleep(0.05)
    assert job.poll() is None, "the training ended before a checkpoint was seen; raise `epochs`"
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert not (store / "backdoor").exists() or not any((store / "backdoor").iterdir())  # nothing complete
    subprocess.run(backdoor_job(store, tmp_path / "rerun", epochs), cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=600)
    record = json.loads((tmp_path / "rerun" / "metrics.json").read_text())
    assert 1 <= record["backdoor"]["resumed_from_epoch"] < epochs
    assert not any(checkpoints.glob("*.pt"))  # discarded once the model is complete
    ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert record["backdoor"]["key"] == ref["backdoor"]["key"]
    stored = [torch.load(next((s / "backdoor").iterdir()) / "model.pt", weights_only=True)
              for s in (tmp_path / "ref_store", store)]
    assert stored[0].keys() == stored[1].keys()
    assert all(torch.equal(stored[0][k], stored[1][k]) for k in stored[0])
