"""Images per second of the project's training loop against a bare PyTorch step, as JSON.

    python benchmarks/train_throughput.py --model convnet --images 10000 --batch-size 256

For each loop (plain supervised training as the experts, teachers and synthetic-set evaluations use it,
and KD with a teacher), the bare step is the least a loop can do: data held as tensors on the device,
a fixed slice per step, forward, loss, backward, SGD step, nothing else. ``kdd_mlflow.train.fit`` adds
shuffling, the learning-rate schedule, on-device loss and accuracy sums read once per epoch, and (for
KD) the teacher's forward pass, which the bare KD step does too. The ratio is fit / bare.

``--precisions`` repeats the comparison with both under bf16 autocast (``fit``'s ``precision="bf16"``).
``--variants`` also times the bare supervised step under channels_last memory format, bf16 autocast
and torch.compile, each against the plain bare step: the loops adopt one only where it helps on the
device at hand.
"""

from __future__ import annotations

import json
import time

import click
import torch
import torch.nn.functional as F

from kdd_mlflow import data, kd, models
from kdd_mlflow.runtime import pick_device
from kdd_mlflow.train import SGDRecipe, fit


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare(model, teacher, loss_fn, x_all, y_all, batch_size, epochs, device, bf16: bool = False) -> float:
    """Seconds for ``epochs`` passes of the bare step (under bf16 autocast when ``bf16``)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        for i in range(0, len(x_all), batch_size):
            x, y = x_all[i:i + batch_size], y_all[i:i + batch_size]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
                if teacher is None:
                    loss = F.cross_entropy(logits, y)
                else:
                    with torch.no_grad():
                        t = teacher(x)
                    loss = loss_fn(logits, t, F.cross_entropy(logits, y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    sync(device)
    return time.perf_counter() - t0


def ours(model, teacher, loss_fn, x_all, y_all, batch_size, epochs, device, precision: str = "fp32") -> float:
    split = data.Split(x_all, y_all)
    objective = kd.kd_objective(teacher, loss_fn) if teacher is not None else None
    sync(device)
    t0 = time.perf_counter()
    fit(model, split, SGDRecipe(epochs, batch_size, 0.01, schedule="cosine", precision=precision),
        torch.Generator().manual_seed(0), progress=False, objective=objective)
    sync(device)
    return time.perf_counter() - t0


@click.command()
@click.option("--dataset", default="fashion-mnist", show_default=True, help="shape only; images are random")
@click.option("--model", default="convnet-w32", show_default=True)
@click.option("--teacher", default="convnet-w64", show_default=True, help="teacher of the KD loop")
@click.option("--images", default=8192, show_default=True)
@click.option("--batch-size", default=256, show_default=True)
@click.option("--epochs", default=2, show_default=True, help="timed epochs per loop (after one warm-up)")
@click.option("--repeats", default=3, show_default=True, help="alternating repeats; the best of each is kept")
@click.option("--device", default="auto", show_default=True)
@click.option("--variants", default="channels_last,bf16,compile", show_default=True,
              help="bare-step variants to time against the plain bare step ('' for none)")
@click.option("--precisions", default="fp32,bf16", show_default=True,
              help="precisions of the fit-against-bare comparison (fit's --precision; the bare step autocasts alike)")
def main(dataset, model, teacher, images, batch_size, epochs, repeats, device, variants, precisions):
    meta = data.info(dataset)
    dev = pick_device(device)
    torch.manual_seed(0)
    x = torch.randn(images, meta.channels, meta.image_size, meta.image_size, device=dev)
    y = torch.randint(meta.num_classes, (images,), device=dev)
    make = lambda name: models.create(name, meta.channels, meta.num_classes, meta.image_size).to(dev)  # noqa: E731
    t_net = make(teacher).eval()
    loss_fn = kd.create_loss("hinton", temperature=2.0, alpha=0.5)
    out = {"dataset": dataset, "model": model, "teacher": teacher, "images": images, "batch_size": batch_size,
           "epochs": epochs, "device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads()}
    for precision in [p for p in precisions.split(",") if p]:
        if precision not in ("fp32", "bf16"):
            raise click.BadParameter(f"unknown precision {precision!r}; choose fp32 or bf16")
        bf16 = precision == "bf16"
        for loop, t in (("supervised", None), ("kd", t_net)):
            best = {"bare": float("inf"), "fit": float("inf")}
            bare(make(model), t, loss_fn, x, y, batch_size, 1, dev, bf16)  # warm-up
            for _ in range(repeats):
                best["bare"] = min(best["bare"], bare(make(model), t, loss_fn, x, y, batch_size, epochs, dev, bf16))
                best["fit"] = min(best["fit"], ours(make(model), t, loss_fn, x, y, batch_size, epochs, dev, precision))
            n = images * epochs
            out[f"{loop}_{precision}"] = {"bare_images_per_s": round(n / best["bare"], 1),
                                          "fit_images_per_s": round(n / best["fit"], 1),
                                          "ratio": round(best["bare"] / best["fit"], 3)}
    out["variants"] = time_variants([v for v in variants.split(",") if v], make, model, x, y, batch_size, epochs,
                                    repeats, dev)
    print(json.dumps(out, indent=2))


def time_variants(names, make, model, x, y, batch_size, epochs, repeats, dev) -> dict:
    """Images per second of the bare supervised step in each variant, and against the plain step."""
    channels_last = x.contiguous(memory_format=torch.channels_last)
    setups = {
        "plain": lambda: (make(model), x, False),
        "channels_last": lambda: (make(model).to(memory_format=torch.channels_last), channels_last, False),
        "bf16": lambda: (make(model), x, True),
        "compile": lambda: (torch.compile(make(model)), x, False),
    }
    unknown = set(names) - set(setups)
    if unknown:
        raise click.BadParameter(f"unknown variant(s) {sorted(unknown)}; choose from {sorted(setups)[1:]}")
    seconds = {}
    for name in ["plain", *names]:
        best = float("inf")
        for _ in range(repeats):
            net, inputs, bf16 = setups[name]()
            bare(net, None, None, inputs, y, batch_size, 1, dev, bf16)  # warm-up (and compilation)
            best = min(best, bare(net, None, None, inputs, y, batch_size, epochs, dev, bf16))
        seconds[name] = best
    n = len(x) * epochs
    return {name: {"images_per_s": round(n / t, 1), "vs_plain": round(seconds["plain"] / t, 3)}
            for name, t in seconds.items()}


if __name__ == "__main__":
    main()
