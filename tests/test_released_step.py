"""The ACR step computes what the authors' released step computes (float64, two full iterations).

`../shared/golden/` holds the released step's own numbers (sangrockEG/ACR 443dff9, `Exp.training_step`), made by the
released code with weights anyone can rebuild (see its README.md): this test rebuilds those weights in this project's
networks, runs two iterations of :func:`acr.method.step.train_step` (the function training calls) on the fixture's
inputs and epochs, and compares every loss term and every parameter's change. The fixture never changes; if modules
are renamed, `names` in the fixture is this project's names as of f623edb -> the released names, and
:data:`RENAMED` below maps today's names to those.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from acr.config import load_config
from acr.method.optim import build_optimizer, build_reconstructor_optimizer
from acr.method.schedules import srf_probability
from acr.method.step import StepCounters, memory_layout, train_step
from acr.models.factory import build_classifier, build_reconstructor
from tests.conftest import REPO
from tests.rayhead import RELEASED_STEP_RUN

GOLDEN = REPO.parent / "shared" / "golden"
MAX_STEP = 52880  # the released run's schedule: 10,582 train_aug images // batch 8 = 1,322 steps x 40 epochs

# This project's loss names -> the released code's keys, with what each term is. The released code names the RU
# terms after the region their mask covers, this project after the Eq. 8 input they reconstruct from, hence the swap.
LOSS_NAMES = {
    "ru/loss": "loss_recon",  # Eq. 7 + encoder BCE + 0.2 auto-encoding: the reconstructor's total
    "ru/loss_encoder_cls": "loss_recon_cls",  # BCE of G_E's classification head
    "ru/loss_autoencode": "loss_recon_full",  # L1 of the decoder on the whole (detached) feature
    "ru/loss_t": "loss_recon_nt",  # Eq. 5/10: input X(A + g(1-A)), mask (1-g)(1-A), weight 0.5
    "ru/loss_nt": "loss_recon_t",  # Eq. 6/10: input X(1 - A + gA), mask (1-g)A, weight 0.3
    "cu/loss": "loss_main",  # Eq. 14: the classifier's total
    "cu/loss_cls": "loss_main_cls",  # L_cls, BCE
    "cu/loss_t": "loss_main_t",  # Eq. 12: -L1 with V_t = 1[A_t = 0], weight 0.8
    "cu/loss_nt": "loss_main_nt",  # Eq. 13: -L1 with V_nt = A_t 1[argmax = t], weight 0.3
}
RENAMED: dict[str, str] = {}  # today's parameter name -> the fixture's (f623edb) name, for modules renamed since
LOSS_REL = 1e-9
CHANGE_REL = 1e-8
# A parameter's summed change can cancel to near zero while its elements move; its rounding error is then set by
# the size of the elements, not of the sum: in float64 about 1e-16 x (sum of |change|) per addition order. 1e-10 of
# the sum of |change| is a million times that, and ten thousand times below the smallest real difference seen
# (changing one hyper-parameter moves the sums by 1e-6 or more of their absolute sum).
CHANGE_FLOOR = 1e-10


def _fixture():
    if not (GOLDEN / "acr_released_step_fp64.json").is_file():
        pytest.skip(f"the released step's numbers are absent ({GOLDEN}); they live in ../shared/golden")
    golden = json.loads((GOLDEN / "acr_released_step_fp64.json").read_text())
    inputs = np.load(GOLDEN / "acr_released_step_fp64.npz")
    return golden, inputs


def _is_batchnorm_state(module_of: dict[str, nn.Module], name: str) -> bool:
    return isinstance(module_of[name.rsplit(".", 1)[0]], nn.modules.batchnorm._BatchNorm)


def recipe_init(net: nn.Module, names: dict[str, str]) -> int:
    """The fixture's weights: each non-BatchNorm parameter from default_rng(crc32(released name)), weights (ndim > 1)
    uniform in +-1/sqrt(prod(shape[1:])), biases in +-0.01, drawn in float64 and rounded to float32; BatchNorm at
    PyTorch's defaults (as built). Returns how many tensors were set."""
    module_of = dict(net.named_modules())
    state = net.state_dict()
    assert set(RENAMED.get(k, k) for k in state) == set(names), "the networks' names no longer match the fixture's"
    count = 0
    with torch.no_grad():
        for name, p in net.named_parameters():
            if _is_batchnorm_state(module_of, name):
                continue
            rng = np.random.default_rng(zlib.crc32(names[RENAMED.get(name, name)].encode()))
            bound = 1.0 / math.sqrt(math.prod(p.shape[1:])) if p.ndim > 1 else 0.01
            p.copy_(torch.from_numpy(rng.uniform(-bound, bound, size=tuple(p.shape)).astype(np.float32)))
            count += 1
    return count


def _no_dropout(net: nn.Module) -> int:
    drops = [m for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    for m in drops:
        m.p = 0.0
    return len(drops)


def _batch(inputs, it: int) -> dict[str, torch.Tensor]:
    """The fixture's inputs as the training loop hands them to train_step (floating tensors in the run's dtype)."""
    return {k: torch.from_numpy(inputs[f"it{it}_{k}"]).to(torch.float64)
            for k in ("image", "labels", "target_u", "grid_u")}


def run_released_workload(overrides: list[str] = ()) -> tuple[list[dict[str, float]], list[dict[str, list[float]]]]:
    """Two iterations of the released workload from the recipe's weights: per iteration the step's losses and, per
    parameter that moved, [sum, sum of |.|] of its change since the start, keyed `classifier:NAME` /
    `reconstructor:NAME` (fixture names)."""
    golden, inputs = _fixture()
    # data.root: the config requires one; the step reads no data (its inputs are the fixture's)
    cfg = load_config(REPO / "configs" / "voc_official.yaml",
                      ["train.batch_size=2", "train.precision=fp64", f"data.root={GOLDEN}", *overrides])
    torch.set_num_threads(max(1, torch.get_num_threads()))
    nets = {"classifier": build_classifier(cfg), "reconstructor": build_reconstructor(cfg)}
    for role, net in nets.items():
        assert recipe_init(net, golden["names"][role]) > 0
        assert _no_dropout(net) > 0  # b6/b7 Dropout2d, U-Net decoder Dropout: the fixture ran with p = 0
    opt_cls = build_optimizer(nets["classifier"], cfg.optim)
    opt_rec = build_reconstructor_optimizer(nets["reconstructor"], cfg.optim)
    for net in nets.values():  # as the training loop: optimisers built, then the networks in the run's precision
        net.to(dtype=torch.float64, memory_format=memory_layout(cfg))
    start = {f"{role}:{RENAMED.get(n, n)}": p.detach().clone()
             for role, net in nets.items() for n, p in net.named_parameters()}
    counters, losses, changes = StepCounters(), [], []
    for it in (1, 2):
        q = srf_probability(cfg.method.srf, golden["iterations"][str(it)]["epoch"])
        losses.append(train_step(nets["classifier"], nets["reconstructor"], opt_cls, opt_rec, _batch(inputs, it),
                                 cfg, q, MAX_STEP, counters, lambda t: t, torch.device("cpu")))
        now = {f"{role}:{RENAMED.get(n, n)}": p.detach() for role, net in nets.items()
               for n, p in net.named_parameters()}
        changes.append({k: [float((now[k] - v).sum()), float((now[k] - v).abs().sum())]
                        for k, v in start.items() if not torch.equal(now[k], v)})
    return losses, changes


def compare(losses, changes) -> list[str]:
    """Every difference from the released step's numbers beyond the tolerances, as lines (empty: identical)."""
    golden, _ = _fixture()
    bad = []
    for it, (got, moved) in enumerate(zip(losses, changes), start=1):
        want = golden["iterations"][str(it)]
        for ours, theirs in LOSS_NAMES.items():
            if got.get(ours) is None or not math.isclose(got[ours], want["losses"][theirs], rel_tol=LOSS_REL):
                bad.append(f"iteration {it} {ours} ({theirs}): {got.get(ours)} vs released {want['losses'][theirs]}")
        expected = want["parameter_change_since_init"]
        for k in sorted(set(expected) ^ set(moved)):
            bad.append(f"iteration {it} {k}: {'moved' if k in moved else 'did not move'} (released: "
                       f"{'moved' if k in expected else 'did not move'})")
        for k in sorted(set(expected) & set(moved)):
            (s, a), (s0, a0) = moved[k], expected[k]
            if not (math.isclose(s, s0, rel_tol=CHANGE_REL, abs_tol=CHANGE_FLOOR * a0)
                    and math.isclose(a, a0, rel_tol=CHANGE_REL)):
                bad.append(f"iteration {it} {k}: change sum {s:.17g}, |.| {a:.17g} vs released {s0:.17g}, {a0:.17g}")
    return bad


@pytest.mark.slow
def test_two_iterations_reproduce_the_released_step():
    """The two iterations run in a process of their own, started by tests/conftest.py when this test is collected
    (`python -m tests.test_released_step --out FILE`); this test, the suite's first, waits for their numbers, so that
    no Ray test shares the machine's memory with them."""
    run = RELEASED_STEP_RUN.get("proc")
    if run is None:  # not started in the background (collected another way): run it here
        losses, changes = run_released_workload()
    else:
        assert run.wait(timeout=3600) == 0, RELEASED_STEP_RUN["log"].read_text()[-3000:]
        result = json.loads(RELEASED_STEP_RUN["out"].read_text())
        losses, changes = result["losses"], result["changes"]
    bad = compare(losses, changes)
    assert not bad, f"{len(bad)} differences from the released step:\n" + "\n".join(bad[:40])


def worst_deviations(losses, changes) -> dict[str, float]:
    """The largest relative deviation from the released numbers: over the loss terms, the change sums (relative to
    the sum of |change|, as the tolerance) and the sums of |change|."""
    golden, _ = _fixture()
    worst = {"loss": 0.0, "change_sum": 0.0, "change_abs_sum": 0.0}
    for it, (got, moved) in enumerate(zip(losses, changes), start=1):
        want = golden["iterations"][str(it)]
        for ours, theirs in LOSS_NAMES.items():
            ref = want["losses"][theirs]
            worst["loss"] = max(worst["loss"], abs(got[ours] - ref) / max(abs(ref), 1e-300))
        for k, (s0, a0) in want["parameter_change_since_init"].items():
            s, a = moved.get(k, (0.0, 0.0))
            worst["change_sum"] = max(worst["change_sum"], abs(s - s0) / max(abs(s0), CHANGE_FLOOR * a0))
            worst["change_abs_sum"] = max(worst["change_abs_sum"], abs(a - a0) / a0)
    return worst


def main(argv: list[str]) -> None:
    """python -m tests.test_released_step [--out FILE] [key=value ...]: how far a (changed) step is off; with --out
    also every number, as JSON, for the test."""
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else None
    overrides = [a for a in argv if "=" in a and a != "--out"]
    losses, changes = run_released_workload(overrides)
    found = compare(losses, changes)
    report = {"overrides": overrides, "worst_relative_deviation": worst_deviations(losses, changes),
              "differences": len(found), "first": found[:5]}
    if out is not None:
        out.write_text(json.dumps({**report, "losses": losses, "changes": changes}))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
