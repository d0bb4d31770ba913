"""The precision policy (bdcore.precision): which precision each kind of device gets, the exact fp32 path,
bf16 training and evaluation close to fp32, and the one-line errors."""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import bdcore.precision as precision
import bdcore.train as train_module
from bdcore.data import DatasetSpec, ImageSet, normalize, random_crop_flip
from bdcore.datasets import make_synthetic
from bdcore.datasets.synthetic import MEAN, STD
from bdcore.evaluate import backdoor_metrics, predict
from bdcore.models import PreActResNet18
from bdcore.precision import autocast, capabilities, resolve_precision, uses_channels_last
from bdcore.train import TrainingHooks, TrainSettings, make_scheduler, train_model

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
SPEC = DatasetSpec("synthetic", 4, 3, 16, 16, (0.5,) * 3, (0.25,) * 3, hflip=True)  # crop and flip


@pytest.fixture
def one_thread():
    # a width-4 net at batch 32 is as fast on one thread, and the suite shares the cores (~5 s here)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ the policy's choice per device kind

@pytest.fixture
def cpu_with(monkeypatch):
    """Pretend this CPU reports the given cpuinfo flags (and whether oneDNN can do bf16 at all)."""
    def fake(flags: dict, mkldnn_bf16: bool = True):
        monkeypatch.setattr(precision, "cpu_features", lambda: dict(flags))
        monkeypatch.setattr(precision, "mkldnn_bf16_supported", lambda: mkldnn_bf16)
    return fake


@pytest.mark.parametrize("flags, mkldnn_bf16, expected", [
    ({"architecture": "x86_64", "avx512_f": True, "avx512_bw": True, "avx512_bf16": True}, True, "bf16"),
    ({"architecture": "x86_64", "amx_tile": True, "amx_bf16": True}, True, "bf16"),
    # AVX512 without BF16: oneDNN runs bf16 by emulation only, slower than fp32 -> fp32
    ({"architecture": "x86_64", "avx512_f": True, "avx512_bw": True, "avx512_bf16": False}, True, "fp32"),
    ({"architecture": "x86_64", "avx2": True}, False, "fp32"),
    # flags present but oneDNN not built / unable: fp32
    ({"architecture": "x86_64", "avx512_bf16": True, "amx_bf16": True}, False, "fp32"),
    ({"architecture": "arm64", "neon": True, "bf16": True}, True, "bf16"),
    ({"architecture": "arm64", "neon": True}, False, "fp32"),
])
def test_auto_on_cpu_is_bf16_only_with_a_native_bf16_path(cpu_with, flags, mkldnn_bf16, expected):
    cpu_with(flags, mkldnn_bf16)
    assert resolve_precision("auto", CPU) == expected
    assert uses_channels_last(CPU, expected) == (expected == "bf16")


def test_explicit_precisions_are_honoured_on_cpu_and_fp16_is_refused(cpu_with):
    cpu_with({"architecture": "x86_64", "avx2": True}, False)  # even without native bf16: asked is asked
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(ValueError) as err:
        resolve_precision("fp16", CPU)
    assert "\n" not in str(err.value) and "precision=fp16" in str(err.value) and "precision=bf16" in str(err.value)


@pytest.mark.parametrize("major, expected", [(8, "bf16"), (9, "bf16"), (7, "fp16"), (6, "fp16")])
def test_auto_on_cuda_is_bf16_from_ampere_on_else_fp16(monkeypatch, major, expected):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major, minor=0))
    assert resolve_precision("auto", CUDA) == expected
    assert resolve_precision("fp32", CUDA) == "fp32" and resolve_precision("fp16", CUDA) == "fp16"
    assert all(uses_channels_last(CUDA, p) for p in ("fp32", "bf16", "fp16"))


def test_auto_on_rocm_is_bf16(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert resolve_precision("auto", CUDA) == "bf16"


def test_auto_elsewhere_is_fp32_and_explicit_names_pass_through():
    mps = torch.device("mps")
    assert resolve_precision("auto", mps) == "fp32"
    assert resolve_precision("bf16", mps) == "bf16" and resolve_precision("fp16", mps) == "fp16"
    assert not uses_channels_last(mps, "bf16")


@pytest.mark.parametrize("name", ["xyz", "FP32", "bfloat16", "", None])
def test_bad_name_raises_one_line(name):
    with pytest.raises(ValueError) as err:
        resolve_precision(name, CPU)
    assert str(err.value) == f"precision={name}; use auto, fp32, bf16 or fp16"
    with pytest.raises(ValueError, match="use auto, fp32, bf16 or fp16"):
        autocast(CPU, name)


def test_layout_and_autocast_need_a_resolved_precision():
    with pytest.raises(ValueError, match="resolve_precision"):
        uses_channels_last(CPU, "auto")
    with pytest.raises(ValueError, match="resolve_precision"):
        autocast(CPU, "auto")


def test_fp32_autocast_switches_an_outer_autocast_off():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
        with autocast(CPU, "fp32"):
            assert (a @ b).dtype == torch.float32
    with autocast(CPU, "bf16"):
        assert (a @ b).dtype == torch.bfloat16


def test_capabilities_record_what_the_policy_read():
    info = capabilities(CPU)
    json.dumps(info)  # JSON-able for metrics.json
    assert info["device"] == "cpu" and info["torch"] == torch.__version__
    assert info["cpu_native_bf16"] == precision.cpu_has_native_bf16()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert (resolve_precision("auto", CPU) == "bf16") == info["cpu_native_bf16"]


# ------------------------------------------------------------------ fp32 is the unchanged reference

def frozen_fp32_loop(model, data, spec, settings, *, seed, hooks):
    """The loop as it was before the precision policy (its CPU path, amp being CUDA-only), kept verbatim:
    fp32 on a CPU must still produce these weights bit for bit."""
    device = CPU
    images, labels = data.images, data.labels
    n = len(labels)
    steps = n // settings.batch_size if settings.drop_last else -(-n // settings.batch_size)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=settings.lr,
                                momentum=settings.momentum, weight_decay=settings.weight_decay)
    scheduler = make_scheduler(optimizer, settings)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    criterion = nn.CrossEntropyLoss()
    shuffle_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    for epoch in range(settings.epochs):
        model.train()
        order = torch.randperm(n, generator=shuffle_gen).to(device)
        for step in range(steps):
            idx = order[step * settings.batch_size:(step + 1) * settings.batch_size]
            x, y = images[idx], labels[idx]
            if settings.augment:
                x = random_crop_flip(x, spec, aug_gen)
            x = normalize(x, spec)
            if hooks.batch_transform is not None:
                x, y = hooks.batch_transform(x, y, epoch)

            def forward_backward():
                with torch.autocast(device.type, enabled=False):
                    out = model(x)
                    total = criterion(out, y)
                    if hooks.extra_loss is not None:
                        total = total + hooks.extra_loss(model, x, y, out, epoch)
                scaler.scale(total).backward()
                return out, total

            optimizer.zero_grad(set_to_none=True)
            for extra in hooks.extra_optimizers:
                extra.zero_grad(set_to_none=True)
            forward_backward()
            if hooks.before_optimizer_step is not None:
                hooks.before_optimizer_step(model, lambda: forward_backward()[1])
            scaler.step(optimizer)
            for extra in hooks.extra_optimizers:
                scaler.step(extra)
            scaler.update()
        scheduler.step()
        if hooks.on_epoch_end is not None:
            hooks.on_epoch_end(epoch)
    model.eval()


def every_hook():
    """All five hooks in use, with an extra trainable module, so each one's position in the step counts."""
    extra = nn.Linear(1, 1)
    torch.nn.init.constant_(extra.weight, 0.5)
    torch.nn.init.constant_(extra.bias, 0.1)
    calls = []
    hooks = TrainingHooks(
        batch_transform=lambda x, y, epoch: (x * 0.9, y),
        extra_loss=lambda model, x, y, out, epoch: 0.01 * out.pow(2).mean() + extra(torch.ones(1, 1)).pow(2).sum(),
        before_optimizer_step=lambda model, recompute: recompute(),
        extra_optimizers=[torch.optim.SGD(extra.parameters(), lr=0.1)],
        on_epoch_end=calls.append)
    return hooks, extra, calls


@pytest.mark.parametrize("hooked", [False, True])
def test_fp32_on_cpu_gives_the_pre_policy_weights_bit_for_bit(hooked, one_thread):
    train, _ = make_synthetic(num_classes=4, size=16, train_per_class=16, test_per_class=1, seed=0)
    settings = TrainSettings(epochs=2, batch_size=16, t_max=2)
    weights = []
    for run in ("frozen", "default", "explicit fp32", "came in channels_last"):
        torch.manual_seed(0)
        model = PreActResNet18(4, 3, width=4)
        hooks, extra, calls = every_hook() if hooked else (TrainingHooks(), None, [])
        if run == "frozen":
            frozen_fp32_loop(model, train, SPEC, settings, seed=3, hooks=hooks)
        else:
            if run == "came in channels_last":
                model.to(memory_format=torch.channels_last)
            kw = {} if run == "default" else {"precision": "fp32"}
            train_model(model, train, SPEC, settings, device=CPU, seed=3, hooks=hooks, progress=False, **kw)
        assert calls == ([0, 1] if hooked else [])
        weights.append([t.clone() for t in model.state_dict().values()] + ([extra.weight.clone()] if hooked else []))
    for other in weights[1:]:
        assert all(torch.equal(a, b) for a, b in zip(weights[0], other))


# ------------------------------------------------------------------ bf16 stays close to fp32

def poisoned_synthetic(size=16, per_class=64, ratio=0.2, patch=4, target=0):
    """A learnable backdoor on tiny images: a white patch in the corner, relabelled to `target`."""
    train, test = make_synthetic(num_classes=4, size=size, train_per_class=per_class, test_per_class=32, seed=0)
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:int(ratio * len(train))]
    images, labels = train.images.clone(), train.labels.clone()
    images[idx, :, -patch:, -patch:] = 255
    labels[idx] = target
    keep = test.labels != target
    bd_images = test.images[keep].clone()
    bd_images[:, :, -patch:, -patch:] = 255
    return ImageSet(images, labels), test, bd_images, torch.full((len(bd_images),), target), test.labels[keep]


def test_bf16_training_and_evaluation_reach_fp32_acc_and_asr(one_thread):
    poisoned, test, bd_images, bd_target, bd_true = poisoned_synthetic()
    spec = DatasetSpec("synthetic", 4, 3, 16, 16, (MEAN,) * 3, (STD,) * 3)
    settings = TrainSettings(epochs=10, batch_size=32, t_max=10, lr=0.05, augment=False)
    results, models = {}, {}
    for prec in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = PreActResNet18(4, 3, width=4)
        train_model(model, poisoned, spec, settings, device=CPU, progress=False, precision=prec)
        results[prec] = backdoor_metrics(model, test, bd_images, bd_target, bd_true, spec, precision=prec)
        models[prec] = model
    fp32, bf16 = results["fp32"], results["bf16"]
    assert fp32["acc"] >= 90 and fp32["asr"] >= 90  # the comparison below is between two learned models
    # stated tolerance: 5 points on ACC and on ASR (measured: 100 / 100 for both)
    assert abs(bf16["acc"] - fp32["acc"]) <= 5 and abs(bf16["asr"] - fp32["asr"]) <= 5
    # autocast took effect, weights stayed fp32, and the model came back NCHW
    weight = models["bf16"].conv1.weight
    assert weight.dtype == torch.float32 and weight.is_contiguous()
    assert not torch.equal(weight, models["fp32"].conv1.weight)


def test_bf16_predict_leaves_the_model_untouched_and_mostly_agrees_with_fp32(one_thread):
    train, test = make_synthetic(num_classes=4, size=16, train_per_class=32, test_per_class=32, seed=0)
    spec = DatasetSpec("synthetic", 4, 3, 16, 16, (MEAN,) * 3, (STD,) * 3)
    torch.manual_seed(0)
    model = PreActResNet18(4, 3, width=4)
    train_model(model, train, spec, TrainSettings(epochs=2, batch_size=32, t_max=2), device=CPU, progress=False)
    model.train()  # predict evaluates in eval mode and hands the mode back
    before = {name: (t, t.stride(), t.clone()) for name, t in model.state_dict(keep_vars=True).items()}
    fp32 = predict(model, test.images, spec, precision="fp32")
    bf16 = predict(model, test.images, spec, precision="bf16")
    assert model.training
    for name, t in model.state_dict(keep_vars=True).items():
        same_tensor, stride, values = before[name]
        assert t is same_tensor and t.stride() == stride and torch.equal(t, values)
    assert (fp32 == bf16).float().mean() >= 0.95
    with torch.no_grad():  # fp32 predict is plain fp32 inference, as before the policy
        model.eval()
        assert torch.equal(fp32, model(normalize(test.images, spec)).argmax(1))


def test_fp16_uses_a_gradient_scaler_and_keeps_fp32_weights(monkeypatch):
    """The scaler's wiring (main and extra optimizers); CPU refuses fp16, so the refusal is bypassed here and
    a linear model keeps it fast (CPU fp16 is slow only in convolution backward)."""
    monkeypatch.setattr(train_module, "resolve_precision", lambda name, device: name)
    scalers = []
    real = precision.grad_scaler

    def recording(device, prec):
        scaler = real(device, prec)
        scalers.append(scaler)
        return scaler

    monkeypatch.setattr(train_module, "grad_scaler", recording)
    train, _ = make_synthetic(num_classes=4, size=8, train_per_class=16, test_per_class=1, seed=0)
    spec = DatasetSpec("synthetic", 4, 3, 8, 8, (MEAN,) * 3, (STD,) * 3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    extra = nn.Linear(1, 1)
    hooks = TrainingHooks(extra_loss=lambda m, x, y, out, e: extra(torch.ones(1, 1)).pow(2).sum(),
                          extra_optimizers=[torch.optim.SGD(extra.parameters(), lr=0.1)])
    before = extra.weight.detach().clone()
    history = train_model(model, train, spec, TrainSettings(epochs=3, batch_size=16, t_max=3, lr=0.01, augment=False),
                          device=CPU, hooks=hooks, progress=False, precision="fp16")
    assert isinstance(scalers[0], torch.amp.GradScaler) and scalers[0].is_enabled()
    assert scalers[0].get_scale() > 0 and model[1].weight.dtype == torch.float32
    assert not torch.equal(extra.weight, before)  # the extra optimizer stepped through the scaler
    assert history[-1]["loss"] < history[0]["loss"]
    assert precision.grad_scaler(CPU, "bf16") is None and precision.grad_scaler(CPU, "fp32") is None


def test_train_model_rejects_a_bad_precision_before_training():
    train, _ = make_synthetic(num_classes=4, size=8, train_per_class=8, test_per_class=1, seed=0)
    spec = DatasetSpec("synthetic", 4, 3, 8, 8, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ValueError, match=r"^precision=half; use auto, fp32, bf16 or fp16$"):
        train_model(nn.Sequential(nn.Flatten(), nn.Linear(192, 4)), train, spec, TrainSettings(epochs=1, batch_size=8),
                    device=CPU, progress=False, precision="half")
