"""Late-phase BatchNorm added to a user's own torchvision ResNet-18 loop, the README way, against the old defaults.

A ResNet-18 (torchvision, num_classes=10) is trained on a Fashion-MNIST subset with the user's optimizer (SGD, lr
0.01, momentum 0.9) for ``--pre-epochs`` epochs; then the same trained network and optimizer are released into
K late-phase BatchNorm members three ways:

* ``old_defaults``: what ``LatePhase(model, K, families)`` did before the optimizer became required: the paper's SGD
  (lr 0.1, Nesterov 0.9, weight decay 5e-4) with fresh momentum, whatever the user trained with; and the old
  evaluation defaults, averaged model with BatchNorm statistics re-estimated from data but ensemble with the stored
  ones (``shared.sgd()`` factories; ``collapse(loader)`` vs ``ensemble_probs(x)``);
* ``inherit``: the README snippet, ``inherit_optimizer_state=opt``, and one BatchNorm rule for both (``loader``);
* ``inherit_zero``: as ``inherit`` with ``phi_momentum="zero"`` (the reference's release).

Printed (and written as JSON with ``--out``): the training loss of the last plain epoch, the mean member training
loss over the first and the last late epoch, the averaged (collapsed) model's test NLL and accuracy, the ensemble's.

    python benchmarks/resnet18_release.py --out resnet18_release.json     # defaults: about 10 CPU minutes
"""
import argparse
import copy
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import shared  # noqa: E402
from deep.data.vision import load_fashion_mnist  # noqa: E402
from shared.checkpoint import atomic_write  # noqa: E402


def data(split: str, n: int, seed: int):
    """n Fashion-MNIST images (a fixed random subset) as 3-channel float tensors normalised per dataset, + labels."""
    d = load_fashion_mnist(".", split)
    idx = torch.randperm(len(d), generator=torch.Generator().manual_seed(seed))[:n]
    x = (d.images[idx].float() / 255 - 0.286) / 0.353
    return torch.utils.data.TensorDataset(x.expand(-1, 3, -1, -1).contiguous(), d.labels[idx])


def evaluate(lp, arm: str, test, bn_loader) -> dict:
    """Test NLL and accuracy of the averaged model and of the ensemble under the arm's BatchNorm rule."""
    x, y = test.tensors
    with torch.no_grad():
        avg = lp.collapse(bn_loader)(x).log_softmax(-1)
        ens = lp.ensemble_probs(x) if arm == "old_defaults" else lp.ensemble_probs(x, bn_loader)
        ens = ens.clamp_min(torch.finfo(ens.dtype).tiny).log()  # a member-wide 0 would make the NLL infinite
    score = lambda logp: {"nll": F.nll_loss(logp, y).item(), "accuracy": (logp.argmax(-1) == y).float().mean().item()}  # noqa: E731
    return {"averaged": score(avg), "ensemble": score(ens)}


def main(args) -> dict:
    torch.manual_seed(args.seed)
    train, test = data("train", args.train, args.seed), data("test", args.test, args.seed + 1)
    g = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch, shuffle=True, drop_last=True, generator=g)
    bn_loader = [x for x, _ in torch.utils.data.DataLoader(train, batch_size=256)][:args.bn_batches]

    import torchvision
    model = torchvision.models.resnet18(num_classes=10)               # the user's model and optimizer
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.pre_epochs):                                   # ordinary training until T0
        pre_losses = []
        for x, y in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            pre_losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        logp = model(test.tensors[0]).log_softmax(-1)
    out = {"pre_release": {"nll": F.nll_loss(logp, test.tensors[1]).item(),
                           "accuracy": (logp.argmax(-1) == test.tensors[1]).float().mean().item()},
           "train_loss_last_pre_epoch": sum(pre_losses) / len(pre_losses), "pre_seconds": time.perf_counter() - start}
    model.train()

    for arm in ("old_defaults", "inherit", "inherit_zero"):
        m, o = copy.deepcopy((model, opt))
        if arm == "old_defaults":
            lp = shared.LatePhase(m, K=args.K, families=[shared.BatchNorm()], theta_optimizer=shared.sgd(),
                                  phi_optimizer=shared.sgd())
        else:
            lp = shared.LatePhase(m, K=args.K, families=[shared.BatchNorm()], inherit_optimizer_state=o,
                                  phi_momentum="zero" if arm == "inherit_zero" else "inherit")
        torch.manual_seed(args.seed + 2)  # the same minibatches for every arm
        losses, start = [], time.perf_counter()
        for _ in range(args.late_epochs):
            losses.append([lp.step(x, y, F.cross_entropy).item() for x, y in shared.stack_batches(loader, K=args.K)])
        out[arm] = {"train_loss_first_late_epoch": sum(losses[0]) / len(losses[0]),
                    "train_loss_last_late_epoch": sum(losses[-1]) / len(losses[-1]),
                    **evaluate(lp, arm, test, bn_loader), "seconds": time.perf_counter() - start}
        print(arm, json.dumps(out[arm]), flush=True)
    out["cpu_seconds"] = time.process_time() - cpu
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=2048, help="training images (a random subset)")
    ap.add_argument("--test", type=int, default=1000, help="test images (a random subset)")
    ap.add_argument("--batch", type=int, default=32, help="minibatch (per member after the release)")
    ap.add_argument("--pre-epochs", type=int, default=2, help="epochs of ordinary training before the release")
    ap.add_argument("--late-epochs", type=int, default=2, help="late-phase epochs (each member sees 1/K of them)")
    ap.add_argument("--K", type=int, default=4, help="members")
    ap.add_argument("--bn-batches", type=int, default=4, help="batches of 256 for BatchNorm re-estimation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args()
    result = {"args": vars(a), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), **main(a)}
    print(json.dumps(result, indent=1))
    if a.out:
        atomic_write(a.out, json.dumps(result, indent=1))
