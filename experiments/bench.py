"""One-run benchmark of the precision policy and the suite's hot paths. Every figure is a ratio against a
reference measured in the same run: the modes are interleaved (their order rotates every round) and each
figure is the median over the rounds, so machine noise hits reference and candidate alike.

    python -m experiments.bench [--width 16] [--quick] [--threads N] [--rounds R] [--device auto]

(a) training and inference img/s per precision x layout, against fp32 NCHW;
(b) bdcore.train.train_model against a bare loop (the ceiling), in the policy's precision and layout;
(c) the data path: our poisoning and on-device crop + normalise against a per-sample PIL DataLoader;
(d) bdcore.evaluate.predict against bare inference, in the policy's precision and layout;
(e) an OTBR gamma x lambda grid reusing stage 1 against recomputing it per cell;
(f) peak memory of each side, from a separate pass (so its allocator settings do not touch the timings).
Model: PreAct-ResNet18 on random Fashion-MNIST-shaped data (1 x 28 x 28, 10 classes): speed does not
depend on the pixel values.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import otbr
from attacks.badnet import BadNet
from bdcore.data import ImageSet, normalize, random_crop_flip
from bdcore.datasets import FashionMNIST
from bdcore.device import select_device
from bdcore.evaluate import predict
from bdcore.models import PreActResNet18
from bdcore.precision import (autocast, capabilities, grad_scaler, memory_format, resolve_precision,
                              uses_channels_last)
from bdcore.train import TrainSettings, train_model

SPEC = FashionMNIST.spec  # crop padding 4, no flip
GAMMAS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
LAMBDAS = tuple(round(0.1 * i, 1) for i in range(1, 11))


# ------------------------------------------------------------------ timing and memory

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory above the block's start, in MiB: CUDA's allocator peak, else the process's resident-set
    high-water mark (Linux: reset through /proc/self/clear_refs). None where neither is available."""

    def __init__(self, device: torch.device):
        self.device, self.mib = device, None

    @staticmethod
    def _status_kib(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                trim_heap()
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
                self.base = self._status_kib("VmRSS")
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        elif self.base is not None:
            self.mib = (self._status_kib("VmHWM") - self.base) / 1024
        return False


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # glibc only
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def trim_heap() -> None:
    if _libc():
        _libc().malloc_trim(0)


def memory_pass_allocator() -> None:
    """For the memory pass only: every allocation above 64 KiB gets its own mapping and is returned to the
    OS when freed, so the resident-set peak of a block is the peak of what the block itself held.
    (Never during timing: a fixed threshold turns every activation into fresh, page-faulting memory.)"""
    if _libc():
        m_trim_threshold, m_mmap_threshold = -1, -3
        _libc().mallopt(m_mmap_threshold, 64 * 1024)
        _libc().mallopt(m_trim_threshold, 128 * 1024)


def median(values):
    return statistics.median(values) if values else float("nan")


# ------------------------------------------------------------------ (a) bare training / inference

def fresh_model(init: dict, width: int, device: torch.device, layout) -> torch.nn.Module:
    model = PreActResNet18(SPEC.num_classes, SPEC.channels, width)
    model.load_state_dict(init)
    return model.to(device).to(memory_format=layout)


def bare_train_steps(model, optimizer, scaler, batches, device, precision, steps) -> None:
    """Forward + cross-entropy + backward + SGD step on ready batches; nothing else."""
    model.train()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = F.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()


class BareTrainer:
    """A warmed-up bare training loop that persists across rounds (its first steps are never timed)."""

    def __init__(self, init, width, device, precision, channels_last, batches):
        layout = torch.channels_last if channels_last else torch.contiguous_format
        self.model = fresh_model(init, width, device, layout)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.scaler = grad_scaler(device, precision)
        self.batches = [(x.contiguous(memory_format=layout), y) for x, y in batches]
        self.device, self.precision = device, precision

    def images_per_second(self, steps: int, warmup: int = 2) -> float:
        bare_train_steps(self.model, self.optimizer, self.scaler, self.batches, self.device, self.precision, warmup)
        sync(self.device)
        start = time.perf_counter()
        bare_train_steps(self.model, self.optimizer, self.scaler, self.batches, self.device, self.precision, steps)
        sync(self.device)
        return steps * len(self.batches[0][1]) / (time.perf_counter() - start)


class BareInference:
    """Forward + arg-max on pre-normalised batches already in the layout, one autocast region."""

    def __init__(self, init, width, device, precision, channels_last, eval_batches):
        layout = torch.channels_last if channels_last else torch.contiguous_format
        self.model = fresh_model(init, width, device, layout).eval()
        self.batches = [x.contiguous(memory_format=layout) for x in eval_batches]
        self.device, self.precision = device, precision

    @torch.no_grad()
    def run(self) -> torch.Tensor:
        with autocast(self.device, self.precision):
            return torch.cat([self.model(x).argmax(1).cpu() for x in self.batches])

    def images_per_second(self) -> float:
        with torch.no_grad(), autocast(self.device, self.precision):
            self.model(self.batches[0])  # warm-up: one full batch, same shape, precision and layout
        sync(self.device)
        start = time.perf_counter()
        self.run()
        sync(self.device)
        return sum(len(x) for x in self.batches) / (time.perf_counter() - start)


# ------------------------------------------------------------------ (b) train_model vs the bare loop

def train_model_images_per_second(init, width, device, data: ImageSet, batch_size, precision, augment) -> float:
    """train_model for two epochs on a fresh model; the second epoch's img/s (the first one warms up)."""
    model = fresh_model(init, width, device, torch.contiguous_format)
    settings = TrainSettings(epochs=2, batch_size=batch_size, t_max=2, augment=augment)
    history = train_model(model, data, SPEC, settings, device=device, seed=0, progress=False, precision=precision)
    return history[-1]["images_per_second"]


class BareAugmentedTrainer(BareTrainer):
    """The bare loop plus exactly the data work train_model does per batch: shuffled gather from the
    on-device uint8 set, on-device random crop, normalisation, layout."""

    def __init__(self, init, width, device, precision, data: ImageSet, batch_size):
        super().__init__(init, width, device, precision, uses_channels_last(device, precision), [])
        self.layout = memory_format(device, precision)
        self.images, self.labels = data.images.to(device), data.labels.to(device)
        self.batch_size = batch_size
        self.shuffle_gen = torch.Generator().manual_seed(0)
        self.aug_gen = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(1)

    def steps(self, count: int) -> None:
        self.model.train()
        order = torch.randperm(len(self.labels), generator=self.shuffle_gen).to(self.device)
        steps_per_pass = len(self.labels) // self.batch_size
        for i in range(count):
            step = i % steps_per_pass
            idx = order[step * self.batch_size:(step + 1) * self.batch_size]
            x = normalize(random_crop_flip(self.images[idx], SPEC, self.aug_gen), SPEC)
            x = x.contiguous(memory_format=self.layout)
            self.batches = [(x, self.labels[idx])]
            bare_train_steps(self.model, self.optimizer, self.scaler, self.batches, self.device, self.precision, 1)

    def images_per_second(self, steps: int, warmup: int = 2) -> float:
        self.steps(warmup)
        sync(self.device)
        start = time.perf_counter()
        self.steps(steps)
        sync(self.device)
        return steps * self.batch_size / (time.perf_counter() - start)


# ------------------------------------------------------------------ (c) data path

def our_epoch_of_batches(images, spec, batch_size, generator) -> None:
    """One epoch of our on-device data work: shuffle, gather, random crop (+flip), normalise."""
    order = torch.randperm(len(images), generator=generator, device=generator.device).to(images.device)
    for start in range(0, len(images) - batch_size + 1, batch_size):
        normalize(random_crop_flip(images[order[start:start + batch_size]], spec, generator), spec)


def pil_loader(images, labels, spec, batch_size):
    """BackdoorBench's train-time transform, per sample on the CPU: ToPILImage -> RandomCrop(pad 4) ->
    ToTensor -> Normalize, through a DataLoader with num_workers=0."""
    import torchvision.transforms as T

    transform = T.Compose([T.ToPILImage(), T.RandomCrop((spec.height, spec.width), padding=spec.crop_padding),
                           T.ToTensor(), T.Normalize(spec.mean, spec.std)])

    class PerSample(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return transform(images[i]), labels[i]

    return torch.utils.data.DataLoader(PerSample(), batch_size=batch_size, shuffle=True, num_workers=0,
                                       drop_last=True)


def per_sample_poisoning(images: torch.Tensor, labels: torch.Tensor, indices, pattern: np.ndarray, target: int):
    """The published style: each poisoned sample stamped on its own H x W x C numpy array."""
    out_images = [img.permute(1, 2, 0).numpy() for img in images]
    out_labels = labels.tolist()
    for i in indices.tolist():
        out_images[i] = np.where(pattern > 0, pattern, out_images[i])
        out_labels[i] = target
    return out_images, out_labels


# ------------------------------------------------------------------ (e) OTBR grid

def otbr_grid(model, nwcs, gammas, lambdas) -> None:
    for gamma in gammas:
        for lambda_ in lambdas:
            otbr.defend(model, seed=0, neuron_weight_changes=nwcs, prune={"ratio": gamma},
                        fusion={"lambda_": lambda_})


# ------------------------------------------------------------------ the run

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="1 round, short runs (a smoke test, noisy)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--no-otbr", action="store_true", help="skip (e)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    rounds = args.rounds or (1 if quick else 3)
    device = select_device(args.device)
    bs = args.batch_size
    train_steps = 4 if quick else 8          # timed steps per bare-loop measurement (after 2 warm-up steps)
    epoch_batches = 4 if quick else 8        # train_model: batches per epoch (2 epochs, the 2nd timed)
    eval_images = 1024 if quick else 4096    # inference / predict, batches of 512 (predict's default)
    data_images = 2560 if quick else 10240   # (c): one epoch of the data path
    load_start = os.getloadavg()
    wall_start = time.perf_counter()

    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    if device.type == "cpu" and resolve_precision("auto", device) != "bf16":
        print("note: this CPU has no native bf16 path; bf16 rows show oneDNN's emulation")
    policy = {p: uses_channels_last(device, p) for p in precisions}

    torch.manual_seed(0)
    init = PreActResNet18(SPEC.num_classes, SPEC.channels, args.width).state_dict()
    gen = torch.Generator().manual_seed(0)
    shape = (SPEC.channels, SPEC.height, SPEC.width)
    train_data = ImageSet(torch.randint(0, 256, (epoch_batches * bs, *shape), generator=gen, dtype=torch.uint8),
                          torch.randint(0, SPEC.num_classes, (epoch_batches * bs,), generator=gen)).to(device)
    batches = [(normalize(train_data.images[i * bs:(i + 1) * bs], SPEC), train_data.labels[i * bs:(i + 1) * bs])
               for i in range(epoch_batches)]
    eval_u8 = torch.randint(0, 256, (eval_images, *shape), generator=gen, dtype=torch.uint8).to(device)
    eval_batches = [normalize(eval_u8[i:i + 512], SPEC) for i in range(0, eval_images, 512)]
    data_u8 = torch.randint(0, 256, (data_images, *shape), generator=gen, dtype=torch.uint8)
    data_labels = torch.randint(0, SPEC.num_classes, (data_images,), generator=gen)
    attack = BadNet(SPEC, target=0)
    pattern_hwc = attack.pattern.permute(1, 2, 0).numpy()
    eval_model = fresh_model(init, args.width, device, torch.contiguous_format).eval()  # as train_model returns it

    lay = {False: "NCHW", True: "channels_last"}
    modes = [(p, cl) for p in precisions for cl in (False, True)]
    trainers = {m: BareTrainer(init, args.width, device, m[0], m[1], batches) for m in modes}
    inferers = {m: BareInference(init, args.width, device, m[0], m[1], eval_batches) for m in modes}
    aug_trainers = {p: BareAugmentedTrainer(init, args.width, device, p, train_data, bs) for p in precisions}

    def our_predict(p):
        predict(eval_model, eval_u8[:512], SPEC, precision=p)  # the same one-batch warm-up as the bare side
        sync(device)
        start = time.perf_counter()
        predict(eval_model, eval_u8, SPEC, precision=p)
        sync(device)
        return eval_images / (time.perf_counter() - start)

    def ours_data_epoch():
        on_device = data_u8.to(device)
        generator = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(0)
        sync(device)
        start = time.perf_counter()
        our_epoch_of_batches(on_device, SPEC, bs, generator)
        sync(device)
        return time.perf_counter() - start

    def pil_data_epoch():
        loader = pil_loader(data_u8, data_labels, SPEC, bs)
        start = time.perf_counter()
        for x, y in loader:
            x.to(device), y.to(device)
        sync(device)
        return time.perf_counter() - start

    def ours_poisoning():
        start = time.perf_counter()
        attack.poison_train(ImageSet(data_u8, data_labels), seed=0)
        return time.perf_counter() - start

    def per_sample_poisoning_seconds():
        start = time.perf_counter()
        per_sample_poisoning(data_u8, data_labels, attack.poison_indices(data_images, 0), pattern_hwc, 0)
        return time.perf_counter() - start

    # Groups of measurements whose ratios are taken. Each round runs every group, the group order rotated
    # by one per round. A pair (reference, candidate) runs reference, candidate, reference and records the
    # reference as the mean of its two runs, so a drift during the candidate cancels; the (a) groups
    # reverse their order every other round. A ratio is the median over rounds of the ratio within a round.
    groups = [[(f"a-train {p} {lay[cl]}", lambda m=(p, cl): trainers[m].images_per_second(train_steps))
               for p, cl in modes],
              [(f"a-infer {p} {lay[cl]}", lambda m=(p, cl): inferers[m].images_per_second()) for p, cl in modes]]
    for p in precisions:
        m = (p, policy[p])
        groups += [
            [(f"b-ceiling {p}", lambda m=m: trainers[m].images_per_second(train_steps)),
             (f"b-ours {p} no-aug", lambda p=p: train_model_images_per_second(
                 init, args.width, device, train_data, bs, p, augment=False))],
            [(f"b-bare {p} aug", lambda p=p: aug_trainers[p].images_per_second(train_steps)),
             (f"b-ours {p} aug", lambda p=p: train_model_images_per_second(
                 init, args.width, device, train_data, bs, p, augment=True))],
            [(f"d-bare {p}", lambda m=m: inferers[m].images_per_second()),
             (f"d-predict {p}", lambda p=p: our_predict(p))]]
    groups += [[("c-ours-epoch", ours_data_epoch), ("c-pil-epoch", pil_data_epoch)],
               [("c-ours-poison", ours_poisoning), ("c-sample-poison", per_sample_poisoning_seconds)]]

    results: dict[str, list[float]] = {}
    for r in range(rounds):
        shift = r % len(groups)
        for group in groups[shift:] + groups[:shift]:
            if len(group) == 2:
                (ref_key, ref_fn), (key, fn) = group
                before, value, after = ref_fn(), fn(), ref_fn()
                results.setdefault(ref_key, []).append((before + after) / 2)
                results.setdefault(key, []).append(value)
                continue
            for key, fn in (group if r % 2 == 0 else group[::-1]):
                results.setdefault(key, []).append(fn())
        print(f"round {r + 1}/{rounds} done ({time.perf_counter() - wall_start:.0f} s)", file=sys.stderr)

    # (e) OTBR: stage 1 once, then the 70-cell grid reusing it; stage 1 does the same work every time,
    # so the recompute-per-cell side is estimated as 70 x stage 1 + the grid, not run
    otbr_rows = None
    if not args.no_otbr:
        otbr_model = fresh_model(init, args.width, device, torch.contiguous_format).eval()
        unlearn = {"noise_shape": shape}
        start = time.perf_counter()
        nwcs = otbr.unlearning_neuron_weight_changes(otbr_model, seed=0, device=device, unlearn=unlearn)
        stage1 = time.perf_counter() - start
        start = time.perf_counter()
        otbr_grid(otbr_model, nwcs, GAMMAS, LAMBDAS)
        grid = time.perf_counter() - start
        otbr_rows = (stage1, grid)

    # (f) memory pass: each side once more, with an allocator that returns freed blocks to the OS
    memory_pass_allocator()
    mem = {}

    def peak(key, fn):
        with PeakMemory(device) as probe:
            fn()
        mem[key] = probe.mib

    for p, cl in modes:
        t = trainers[(p, cl)]
        peak(f"a-train {p} {lay[cl]}", lambda t=t, p=p: bare_train_steps(t.model, t.optimizer, t.scaler, t.batches,
                                                                        device, p, 2))
        peak(f"a-infer {p} {lay[cl]}", lambda m=(p, cl): inferers[m].run())
    for p in precisions:
        def bare_fresh(p=p):  # model, optimizer and batches made inside, as train_model makes its own
            t = BareTrainer(init, args.width, device, p, policy[p], batches)
            bare_train_steps(t.model, t.optimizer, t.scaler, t.batches, device, p, 2)
        peak(f"b-ceiling {p}", bare_fresh)
        peak(f"b-ours {p} no-aug", lambda p=p: train_model_images_per_second(init, args.width, device, train_data,
                                                                             bs, p, augment=False))
        mem[f"d-bare {p}"] = mem[f"a-infer {p} {lay[policy[p]]}"]
        peak(f"d-predict {p}", lambda p=p: predict(eval_model, eval_u8, SPEC, precision=p))
    for key, fn in (("c-ours-epoch", ours_data_epoch), ("c-pil-epoch", pil_data_epoch),
                    ("c-ours-poison", ours_poisoning), ("c-sample-poison", per_sample_poisoning_seconds)):
        peak(key, fn)
    if otbr_rows:
        peak("e-stage1", lambda: otbr.unlearning_neuron_weight_changes(
            otbr_model, seed=0, device=device, unlearn={**unlearn, "steps": 2}))
        peak("e-cells", lambda: otbr_grid(otbr_model, nwcs, GAMMAS[:2], LAMBDAS[:2]))

    report(args, device, rounds, precisions, policy, results, mem, otbr_rows, load_start,
           time.perf_counter() - wall_start, dict(train_steps=train_steps, epoch_batches=epoch_batches,
                                                  eval_images=eval_images, data_images=data_images))


def fmt_mem(value) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def verdict(value: float, goal: float) -> str:
    return f">= {goal:g}: " + ("met" if value >= goal else "NOT met")


def report(args, device, rounds, precisions, policy, results, mem, otbr_rows, load_start, wall, sizes):
    def med(key):
        return median(results[key])

    def ratio(candidate, reference):
        """Median over rounds of candidate / reference within the same round."""
        return median([c / r for c, r in zip(results[candidate], results[reference])])

    caps = capabilities(device)
    flags = ", ".join(k for k, v in caps["cpu_flags"].items() if v)
    lay = {False: "NCHW", True: "channels_last"}
    bs = args.batch_size
    print(f"# experiments.bench: PreAct-ResNet18 width {args.width}, input 1x28x28, batch {bs}\n")
    print("    python -m experiments.bench " + " ".join(sys.argv[1:]) + "\n")
    print(f"device {device}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"cpu capability {caps['cpu_capability']} ({flags}); native bf16 {caps['cpu_native_bf16']}"
          + (f"; GPU {caps['cuda']['name']}" if "cuda" in caps else ""))
    print(f"{rounds} interleaved round(s); img/s are medians over rounds, ratios are medians of the per-round "
          f"ratios; load average at start {load_start[0]:.1f}, at end {os.getloadavg()[0]:.1f} (other "
          f"processes share these cores); total {wall:.0f} s; policy layouts: "
          + ", ".join(f"{p} -> {lay[policy[p]]}" for p in precisions) + "\n")

    print("## (a) precision x layout, bare loops (reference: fp32 NCHW)\n")
    print(f"training: forward + backward + SGD step on ready batches ({sizes['train_steps']} timed steps after 2 "
          f"warm-up steps, persistent model); inference: forward + arg-max, batches of 512, {sizes['eval_images']} "
          "images, one autocast region, after a one-batch warm-up. Peak MiB = memory above the block's start "
          "(activations, gradients, temporaries).\n")
    print("| precision | layout | train img/s | train ratio | infer img/s | infer ratio | train peak MiB "
          "| infer peak MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for p in precisions:
        for cl in (False, True):
            mode = f"{p} {lay[cl]}"
            train_ratio = ratio("a-train " + mode, "a-train fp32 NCHW")
            infer_ratio = ratio("a-infer " + mode, "a-infer fp32 NCHW")
            print(f"| {p} | {lay[cl]} | {med('a-train ' + mode):.0f} | {train_ratio:.2f} "
                  f"| {med('a-infer ' + mode):.0f} | {infer_ratio:.2f} | "
                  f"{fmt_mem(mem.get('a-train ' + mode))} | {fmt_mem(mem.get('a-infer ' + mode))} |")

    print("\n## (b) bdcore.train.train_model / bare loop, same precision, layout, batch size, on-device data\n")
    print(f"train_model: fresh model, 2 epochs of {sizes['epoch_batches']} batches, the 2nd epoch's img/s (per epoch: "
          "shuffle; per batch: gather, [crop], normalise, layout, loss / accuracy bookkeeping; scheduler). "
          "Augmentation in neither: the ceiling is the (a) bare loop on pre-normalised batches already in the "
          "layout (no gather, no normalise). Augmentation in both: the bare loop plus the same shuffle + gather "
          "+ on-device crop + normalise per batch. Each ceiling is measured right before and after its "
          "train_model run (mean of the two). "
          "Goal >= 0.90. Peak MiB: a whole call (model copy, optimizer state, activations).\n")
    print("| precision (layout) | augmentation | train_model img/s | bare img/s | ratio | goal | "
          "train_model peak MiB | bare peak MiB |")
    print("|---|---|---:|---:|---:|---|---:|---:|")
    for p in precisions:
        for aug, ours, bare in (("neither", f"b-ours {p} no-aug", f"b-ceiling {p}"),
                                ("both", f"b-ours {p} aug", f"b-bare {p} aug")):
            r = ratio(ours, bare)
            memory = (f"{fmt_mem(mem.get(ours))} | {fmt_mem(mem.get(bare))}" if aug == "neither" else " | ")
            print(f"| {p} ({lay[policy[p]]}) | {aug} | {med(ours):.0f} | {med(bare):.0f} | {r:.2f} | "
                  f"{verdict(r, 0.90)} | {memory} |")
    for p in precisions[1:]:
        r = ratio(f"b-ours {p} aug", "b-ours fp32 aug")
        print(f"\ntrain_model {p} / train_model fp32, each in its policy layout, with augmentation: {r:.2f} "
              f"({verdict(r, 1.7)})")

    print(f"\n## (c) data path, {sizes['data_images']} images, batch {bs} (seconds; ratio = per-sample / ours)\n")
    print("ours: on-device shuffle + gather + random_crop_flip + normalise; BackdoorBench-style: DataLoader over "
          "per-sample ToPILImage -> RandomCrop(28, padding 4) -> ToTensor -> Normalize, num_workers=0, batches "
          "moved to the device. Poisoning (once per training, BadNet at 10 %): Attack.poison_train vs a "
          "per-sample numpy stamp on H x W x C arrays. Ours is timed before and after the per-sample side.\n")
    print("| step | ours s | per-sample s | ratio | goal | ours peak MiB | per-sample peak MiB |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for name, ours, theirs, goal in (("augment + normalise, one epoch", "c-ours-epoch", "c-pil-epoch", 10),
                                     ("poisoning", "c-ours-poison", "c-sample-poison", None)):
        r = ratio(theirs, ours)
        print(f"| {name} | {med(ours):.4f} | {med(theirs):.4f} | {r:.1f} | {verdict(r, goal) if goal else ''} | "
              f"{fmt_mem(mem.get(ours))} | {fmt_mem(mem.get(theirs))} |")

    print(f"\n## (d) bdcore.evaluate.predict / bare inference, same precision and layout, {sizes['eval_images']} "
          "uint8 images\n")
    print("predict: per batch normalise + layout, the model's weights temporarily in the layout, one autocast "
          "region; bare: the (a) inference loop on pre-normalised batches with the model already in the layout, "
          "measured right before and after it. Both after a one-batch warm-up. Goal >= 0.95.\n")
    print("| precision (layout) | predict img/s | bare img/s | ratio | goal | predict peak MiB | bare peak MiB |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for p in precisions:
        r = ratio(f"d-predict {p}", f"d-bare {p}")
        print(f"| {p} ({lay[policy[p]]}) | {med(f'd-predict {p}'):.0f} | {med(f'd-bare {p}'):.0f} | {r:.2f} | "
              f"{verdict(r, 0.95)} | {fmt_mem(mem.get(f'd-predict {p}'))} | {fmt_mem(mem.get(f'd-bare {p}'))} |")
    for p in precisions[1:]:
        r = ratio(f"d-predict {p}", "d-predict fp32")
        print(f"\npredict {p} / predict fp32, each in its policy layout: {r:.2f} ({verdict(r, 2.5)})")

    if otbr_rows:
        stage1, grid = otbr_rows
        cells = len(GAMMAS) * len(LAMBDAS)
        reuse, recompute = stage1 + grid, cells * stage1 + grid
        print(f"\n## (e) OTBR {len(GAMMAS)} x {len(LAMBDAS)} grid (gamma {', '.join(map(str, GAMMAS))}; lambda "
              f"{LAMBDAS[0]}..{LAMBDAS[-1]}), fp32, measured once\n")
        print(f"reuse: stage 1 (otbr.unlearning_neuron_weight_changes, 20 steps x 256 noise images "
              f"{SPEC.channels}x28x28) once, then {cells} x otbr.defend(neuron_weight_changes=...). Recompute per "
              f"cell is ESTIMATED as {cells} x the measured stage 1 + the measured grid (stage 1 does the same work "
              "for every cell), not run. Peak MiB: one stage 1 (2 steps: more steps do not raise the peak) and "
              "4 grid cells.\n")
        print("| | seconds | peak MiB |\n|---|---:|---:|")
        print(f"| stage 1 once | {stage1:.2f} | {fmt_mem(mem.get('e-stage1'))} |")
        print(f"| grid reusing stage 1 ({cells} cells) | {grid:.2f} | {fmt_mem(mem.get('e-cells'))} |")
        print(f"| reuse total | {reuse:.2f} | |")
        print(f"| recompute per cell (estimate) | {recompute:.2f} | |")
        print(f"\nrecompute / reuse: {recompute / reuse:.1f} ({verdict(recompute / reuse, 5)})")

    print("\nevery round (img/s; seconds for (c)):\n")
    for key, values in results.items():
        print(f"    {key}: " + ", ".join(f"{v:.4g}" for v in values))


if __name__ == "__main__":
    main()
