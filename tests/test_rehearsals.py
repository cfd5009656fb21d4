"""CPU rehearsals of the GPU protocol's defaults: `torch.compile` (`--compile true`) and bf16 autocast, so both paths
are exercised before any GPU day. torch.compile works on the CPU (inductor generates C++; gcc is needed) and CPU
autocast supports bf16.

The compile tests are marked ``slow`` (each compiles a few graphs: 10-60 s on a loaded 2-core machine) but not
``kernels``: inductor generates its own C++ for the CPU it runs on, whatever ATen's kernels are (and under
ATEN_CPU_CAPABILITY=default torch 2.14.1's inductor emits vector code its headers then do not declare)."""
import math
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from shared import BatchNorm, Head, LatePhase
from tolerances import rounding_tol

K, B = 2, 4
# inductor compiles C++ on the CPU
needs_compiler = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                    reason="torch.compile on the CPU needs a C++ compiler (g++ or clang++)")


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


def batch(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def dynamo_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process, from torch._dynamo's counters. With no graph break,
    every recompile (a guard failure: another shape, grad mode, module attribute) is one more graph."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


# Compiled and eager differ by float rounding only (inductor fuses and reorders the sums). Bound: the largest sum
# is a BatchNorm statistic over B * 8 * 8 = 256 values per channel; 5 layers and 5 steps in a row.
TRAIN_TOL = rounding_tol(n=256, chain=25)


@pytest.mark.slow
@needs_compiler
def test_compiled_steps_equal_eager_in_both_phases():
    """A few plain SGD steps and late-phase outer steps (vectorized path, late-phase BatchNorm + head) of a compiled
    model equal the eager ones within float32 rounding; each phase compiles to one graph, without a graph break or a
    recompile (shared.LatePhase's stacked BatchNorm traces into the graph under torch.compile)."""
    torch._dynamo.reset()
    eager, compiled = convnet(), convnet()
    compiled.compile()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (eager, compiled)]
    graphs0, breaks0 = dynamo_counts()
    for s in range(3):
        x, y = batch(s, B)
        for m, opt in zip((eager, compiled), opts):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            opt.step()
    graphs1, breaks1 = dynamo_counts()
    assert (graphs1 - graphs0, breaks1 - breaks0) == (1, 0), "plain phase: one graph, no break, no recompile"
    for p, q in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(q, p, **TRAIN_TOL)

    lps = [LatePhase(m, K, [BatchNorm(), Head()], inherit_optimizer_state=opt) for m, opt in zip((eager, compiled),
                                                                                                 opts)]
    torch.compiler.reset()  # as the trainer does at the release: the plain graph can never run again
    compiled.compile()
    for s in range(3):
        x, y = batch(10 + s, K * B)
        le, lc = (lp.step(x, y, F.cross_entropy) for lp in lps)
        torch.testing.assert_close(lc, le, **TRAIN_TOL)
    graphs2, breaks2 = dynamo_counts()
    assert (graphs2 - graphs1, breaks2 - breaks1) == (1, 0), "late phase: one graph, no break, no recompile"
    sa, sb = (lp.model.state_dict() for lp in lps)
    for k in sa:
        if sa[k].is_floating_point():
            torch.testing.assert_close(sb[k], sa[k], **TRAIN_TOL, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(sb[k], sa[k]), k


SYNTHETIC = dict(arch="wrn-10-1", epochs=4, T0=2, K=2, batch_size=8, phi=("bn", "head"), synthetic_size=64,
                 eval_batch_size=32)


@pytest.mark.slow
@needs_compiler
def test_compiled_run_has_no_graph_break_and_no_recompile(tmp_path):
    """`python -m deep train --config synthetic_bench --arch wrn-10-1 --epochs 4 --T0 2 --K 2 --batch-size 8
    --phi bn head --synthetic-size 64 --eval-batch-size 32 --compile true` compiles exactly two graphs -- the plain
    training step and the late-phase one -- with no graph break and no recompile (it logged 72 graph-break lines
    and 15 recompiles under TORCH_LOGS="graph_breaks,recompiles" before: the stacked BatchNorm's out= kernels, the
    evaluation's forms of the model, the stale plain graphs after the release); and trains as the eager run does."""
    from deep.config import get_config
    from deep.images import ImageRun

    def train(compile):
        cfg = get_config("synthetic_bench", compile=compile, **SYNTHETIC)
        with ImageRun(cfg, out=str(tmp_path / f"compile_{compile}"), device="cpu", progress=False, quiet=True) as r:
            result = r.train()
            return [e["loss"] for e in r.log], result

    eager, eager_result = train(False)
    torch._dynamo.reset()
    graphs0, breaks0 = dynamo_counts()
    compiled, compiled_result = train(True)
    graphs1, breaks1 = dynamo_counts()
    assert (graphs1 - graphs0, breaks1 - breaks0) == (2, 0)
    # 16 SGD steps of a 10-layer network: float rounding grows along the trajectory (ReLU kinks, BatchNorm over 8
    # images), so the losses agree to 1e-2, not to a per-operation bound (that is the test above)
    assert compiled == pytest.approx(eager, rel=1e-2)
    for model in ("averaged", "ensemble"):
        assert compiled_result["models"][model]["stored"]["nll"] == pytest.approx(
            eager_result["models"][model]["stored"]["nll"], rel=1e-2)


@pytest.mark.kernels
def test_bf16_autocast_training_and_evaluation_on_cpu(tmp_path, monkeypatch):
    """The CUDA default `--bf16 true` rehearsed on the CPU: the same synthetic run with bf16 autocast in every forward
    pass (plain steps, late-phase steps, evaluation) trains to finite losses close to float32's, keeps the weights in
    float32, names its precision in results.json and evaluates its probabilities in float32 (softmax of the bf16
    logits in float32, as on CUDA)."""
    import deep.evaluate
    from deep.config import get_config
    from deep.images import ImageRun
    # on the CPU the trainer picks float32 (amp None); set here, every forward pass takes bf16 autocast as on CUDA
    seen = []
    probs = deep.evaluate._probs
    monkeypatch.setattr(deep.evaluate, "_probs", lambda logits: seen.append(logits.dtype) or probs(logits))

    def train(bf16):
        cfg = get_config("synthetic_bench", **SYNTHETIC)
        with ImageRun(cfg, out=str(tmp_path / f"bf16_{bf16}"), device="cpu", progress=False, quiet=True) as r:
            if bf16:
                r.amp = torch.bfloat16
            result = r.train()
            assert all(p.dtype == torch.float32 for p in r.lp.model.parameters())
            return [e["loss"] for e in r.log], result

    f32, f32_result = train(False)
    assert set(seen) == {torch.float32}
    seen.clear()
    bf, bf_result = train(True)
    assert set(seen) == {torch.bfloat16}  # the forward passes ran in bf16 ...
    p = deep.evaluate.predict_plain(torch.nn.Linear(2, 3), lambda: iter([(torch.randn(4, 2), torch.zeros(4))]), {},
                                    torch.bfloat16)
    assert p["test"].dtype == torch.float32  # ... the probabilities are float32
    assert bf_result["hardware"]["precision"] == "bf16 autocast" and f32_result["hardware"]["precision"] == "float32"
    assert all(math.isfinite(v) for v in bf)
    # bf16 rounds each layer's output to 8 bits of mantissa: through the 10 layers of WRN-10-1 the relative
    # errors add up to 10 eps_bf16 (on this model's modest 16 steps they stay about that size; 0.2-3 % measured,
    # the larger with ATen's default kernels)
    rel = rounding_tol(1, "bfloat16", chain=10)["rtol"]
    assert bf == pytest.approx(f32, rel=rel)
    for model in ("averaged", "ensemble"):
        for rule in ("stored", "reestimated"):
            got, want = bf_result["models"][model][rule]["nll"], f32_result["models"][model][rule]["nll"]
            assert math.isfinite(got) and got == pytest.approx(want, rel=rel)
