"""The three JEI-DNN training phases (docs/training.md, "Training").

1. ``train_backbone``: the plain backbone (stem, blocks, head) with CE on its head; best
   validation-accuracy weights are kept. It is frozen afterwards.
2. ``warmup_ims``: IMs only, loss ``CE(head) + sum_l (G+1-l) CE(IM_l)`` (l 0-based), each IM
   early-stopped on its own validation accuracy with its best weights restored.
3. ``bilevel``: alternating GATE and CLASSIFIER phases. GATE: BCE-with-logits of every gate
   against oracle targets (``l* = argmin_l CE_l + lambda c_l``; ``t_l = [l >= l*]``) with per-gate
   ``pos_weight`` from the last validation pass (``cfg.pos_weight`` picks the rule). CLASSIFIER:
   mean CE over the IMs (or the gate-weighted variant). Each epoch starts with GATE.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from jei_edge.train.config import TrainConfig
from jei_edge.train.features import FrozenFeatures, exit_outputs, heads_train_mode, im_logits
from jei_edge.train.metrics import cross_entropy, oracle_exits, pos_weights, summarize, exit_predictions


def _bar(total: int, desc: str, progress: bool):
    from jei_edge._deps import require

    tqdm = require("tqdm").tqdm
    return tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)


def _cosine(optimizer, total_steps: int, lr_min: float):
    base = [g["lr"] for g in optimizer.param_groups]

    def set_step(step: int):
        t = min(step / max(total_steps, 1), 1.0)
        for g, b in zip(optimizer.param_groups, base):
            g["lr"] = lr_min + 0.5 * (b - lr_min) * (1.0 + math.cos(math.pi * t))

    return set_step


def _order(n: int, gen: torch.Generator, batch_size: int) -> List[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


@torch.no_grad()
def _plain_accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model.plain_backbone()(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    return correct / max(len(x), 1)


def train_backbone(model, cfg: TrainConfig, xtr, ytr, xval, yval, gen: torch.Generator, progress: bool) -> Dict:
    """Phase 1: supervised training of the plain backbone; returns a small history record."""
    x, y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    xv, yv = torch.from_numpy(xval), torch.from_numpy(yval)
    record = {"epochs": cfg.backbone_epochs, "val_accuracy": [_plain_accuracy(model, xv, yv)]}
    if cfg.backbone_epochs == 0:
        return record
    params = [p for p in model.backbone_parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.backbone_lr, weight_decay=cfg.backbone_weight_decay)
    steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
    set_lr = _cosine(opt, cfg.backbone_epochs * steps_per_epoch, cfg.backbone_lr * 0.01)
    best_acc, best_state, step = record["val_accuracy"][0], copy.deepcopy(model.state_dict()), 0
    plain = model.plain_backbone()
    bar = _bar(cfg.backbone_epochs * steps_per_epoch, "backbone", progress)
    for epoch in range(cfg.backbone_epochs):
        plain.train()
        for idx in _order(len(x), gen, cfg.batch_size):
            set_lr(step)
            step += 1
            logits = plain.head(_blocks(plain, random_shift(x[idx], cfg.augment_shift, gen)))
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", val_acc=f"{best_acc:.3f}", refresh=False)
        acc = _plain_accuracy(model, xv, yv)
        record["val_accuracy"].append(acc)
        if acc > best_acc:
            best_acc, best_state = acc, copy.deepcopy(model.state_dict())
    bar.close()
    model.load_state_dict(best_state)
    record["best_val_accuracy"] = best_acc
    return record


def random_shift(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by a random integer offset in ``[-shift, shift]`` (edge pixels repeated)."""
    if shift <= 0:
        return x
    b, _, h, w = x.shape
    xp = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    oy = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h)[None, :])[:, :, None]
    cols = (ox[:, None] + torch.arange(w)[None, :])[:, None, :]
    return xp[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2).contiguous()


def _blocks(plain, x):
    h = plain.stem(x)
    for b in plain.blocks:
        h = b(h)
    return h


def warmup_ims(model, cfg: TrainConfig, ftr: FrozenFeatures, ytr, fval: FrozenFeatures, yval,
               gen: torch.Generator, progress: bool) -> Dict:
    """Phase 2: IM warm-up with the weighted CE and per-IM early stopping on validation accuracy."""
    G = model.num_gates
    y = torch.from_numpy(ytr)
    record: Dict = {"val_accuracy": [], "stopped_at": [None] * G}
    if G == 0 or cfg.im_epochs == 0:
        return record
    opt = torch.optim.SGD(model.ims.parameters(), lr=cfg.im_lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    weights = [float(G + 1 - l) for l in range(G)]
    best = [-1.0] * G
    best_state = [copy.deepcopy(im.state_dict()) for im in model.ims]
    waited = [0] * G
    active = [True] * G
    steps = math.ceil(ftr.n / cfg.batch_size)
    bar = _bar(cfg.im_epochs * steps, "IM warm-up", progress)
    for epoch in range(cfg.im_epochs):
        heads_train_mode(model, True)
        for idx in _order(ftr.n, gen, cfg.batch_size):
            hs, final = ftr.batch(idx)
            loss = F.cross_entropy(final, y[idx])  # constant: the head is frozen (kept as in the paper)
            for l, z in enumerate(im_logits(model.ims, hs)):
                if active[l]:
                    loss = loss + weights[l] * F.cross_entropy(z, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", active=sum(active), refresh=False)
        logits, _ = exit_outputs(model, fval)
        accs = (logits[:, :G].argmax(-1) == yval[:, None]).mean(0).tolist()
        record["val_accuracy"].append(accs)
        for l in range(G):
            if not active[l]:
                continue
            if accs[l] > best[l]:
                best[l], waited[l] = accs[l], 0
                best_state[l] = copy.deepcopy(model.ims[l].state_dict())
            else:
                waited[l] += 1
                if waited[l] >= cfg.im_patience:
                    active[l] = False
                    record["stopped_at"][l] = epoch + 1
        if not any(active):
            break
    bar.close()
    for l in range(G):
        model.ims[l].load_state_dict(best_state[l])
    record["best_val_accuracy"] = best
    return record


def validation_pass(model, fval: FrozenFeatures, yval: np.ndarray, costs: Dict, lam: float, cap: float,
                    rule: str = "reference") -> Dict:
    """Oracle exits on validation -> gate pos_weights (``rule``); plus the JEI validation accuracy/cost."""
    logits, gates = exit_outputs(model, fval)
    oracle = oracle_exits(cross_entropy(logits, yval), costs["cost"], lam)
    idx, probs, _ = exit_predictions(logits, gates)
    s = summarize(probs, idx, yval, costs)
    return {"pos_weights": pos_weights(oracle, model.num_gates, cap, rule),
            "oracle_histogram": np.bincount(oracle, minlength=model.num_exits).tolist(),
            "accuracy": s["accuracy"], "mean_cost": s["mean_cost"], "exit_histogram": s["exit_histogram"]}


def _gate_loss(model, zs: Sequence[torch.Tensor], final, y, costs_t, lam: float, pw: torch.Tensor):
    z_all = torch.stack([z.detach() for z in zs] + [final], dim=1)  # [B, K, C]
    ce = F.cross_entropy(z_all.transpose(1, 2), y[:, None].expand(-1, z_all.shape[1]), reduction="none")
    oracle = torch.argmin(ce + lam * costs_t[None, :], dim=1)
    targets = (torch.arange(model.num_gates)[None, :] >= oracle[:, None]).float()
    gl = torch.stack([gate(z) for gate, z in zip(model.gates, zs)], dim=1)
    return F.binary_cross_entropy_with_logits(gl, targets, pos_weight=pw)


def _classifier_loss(model, zs: Sequence[torch.Tensor], y, kind: str):
    ce = torch.stack([F.cross_entropy(z, y, reduction="none") for z in zs], dim=1)  # [B, G]
    if kind == "mean":
        return ce.mean()
    with torch.no_grad():  # gate-weighted: CE_l weighted by the detached p_exit_l
        g = torch.sigmoid(torch.stack([gate(z) for gate, z in zip(model.gates, zs)], dim=1))
        before = torch.cumsum(g, dim=1) - g
        w = torch.clamp(torch.minimum(g, 1.0 - before), min=0.0)
    return (w * ce).sum() / w.sum().clamp_min(1e-8)


def bilevel(model, cfg: TrainConfig, ftr: FrozenFeatures, ytr, fval: FrozenFeatures, yval, costs: Dict,
            gen: torch.Generator, progress: bool) -> Dict:
    """Phase 3: the GATE / CLASSIFIER alternation; returns the history of validation passes."""
    G = model.num_gates
    y = torch.from_numpy(ytr)
    costs_t = torch.tensor(costs["cost"], dtype=torch.float32)
    val = validation_pass(model, fval, yval, costs, cfg.lam, cfg.pos_weight_cap, cfg.pos_weight)
    record: Dict = {"validation": [val], "switch_every": None}
    if G == 0 or (cfg.epochs == 0 and cfg.min_steps == 0):
        return record
    steps = math.ceil(ftr.n / cfg.batch_size)
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / steps))
    switch = cfg.switch_every or max(1, min(200, steps // 2))
    record["switch_every"], record["epochs"] = switch, epochs
    params = list(model.ims.parameters()) + list(model.gates.parameters())
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    set_lr = _cosine(opt, epochs * steps, cfg.lr_min)
    bar = _bar(epochs * steps, f"bi-level (lambda={cfg.lam:g})", progress)
    step = 0
    losses = {"gate": float("nan"), "clf": float("nan")}
    for epoch in range(epochs):
        heads_train_mode(model, True)
        pw = torch.tensor(val["pos_weights"], dtype=torch.float32)
        for b, idx in enumerate(_order(ftr.n, gen, cfg.batch_size)):
            set_lr(step)
            step += 1
            hs, final = ftr.batch(idx)
            zs = im_logits(model.ims, hs)
            gate_phase = (b // switch) % 2 == 0
            if gate_phase:
                loss = _gate_loss(model, zs, final, y[idx], costs_t, cfg.lam, pw)
            else:
                loss = _classifier_loss(model, zs, y[idx], cfg.classifier_loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if gate_phase:  # only the phase's own parameters move
                for p in model.ims.parameters():
                    p.grad = None
            else:
                for p in model.gates.parameters():
                    p.grad = None
            opt.step()
            losses["gate" if gate_phase else "clf"] = loss.item()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, gate=f"{losses['gate']:.3f}", clf=f"{losses['clf']:.3f}",
                            val_acc=f"{val['accuracy']:.3f}", cost=f"{val['mean_cost']:.3f}", refresh=False)
        val = validation_pass(model, fval, yval, costs, cfg.lam, cfg.pos_weight_cap, cfg.pos_weight)
        val["epoch"] = epoch + 1
        record["validation"].append(val)
    bar.close()
    hist = record["validation"]  # keep ~20 evenly spaced passes (always the first and the last)
    keep = sorted(set(np.linspace(0, len(hist) - 1, min(len(hist), 20)).round().astype(int).tolist()))
    record["validation"] = [hist[i] for i in keep]
    return record
