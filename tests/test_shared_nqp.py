"""Theory check: the late-phase core (both execution paths) on the noisy quadratic problem reproduces nqp's exact
stationary excess losses, for additive and multiplicative late-phase weights, within Monte Carlo error (|z| < 4)."""
import pytest

from nqp import LatePhase as NQPLatePhase
from nqp import Problem, steady_state
from shared.nqp_torch import simulate

K = 4
SETTINGS = {
    # additive: any noise level (the dynamics are linear); Nesterov momentum, gamma_theta = 1 (sum)
    "additive": dict(h=[1.0, 0.5], s=[1.0, 2.0], w=[1.0, -0.5], lr_theta=0.05, lr_phi=0.2, gamma_theta=1.0,
                     momentum=0.5, nesterov=True),
    # multiplicative: nqp's value is the small-noise linearisation about the balanced optimum, so s << w*^2;
    # heavy-ball momentum, gamma_theta = 1/K (mean)
    "multiplicative": dict(h=[1.0, 0.5], s=[1e-4, 2e-4], w=[1.0, -0.5], lr_theta=0.2, lr_phi=0.2,
                           gamma_theta=1.0 / K, momentum=0.3, nesterov=False),
}


@pytest.mark.parametrize("path", ["vectorized", "sequential"])
@pytest.mark.parametrize("kind", sorted(SETTINGS))
def test_core_matches_nqp_steady_state(kind, path):
    c = SETTINGS[kind]
    method = NQPLatePhase(K, c["lr_theta"], c["lr_phi"], c["gamma_theta"], c["momentum"], c["nesterov"], kind=kind)
    exact = steady_state(Problem.from_values(c["h"], c["s"], c["w"]), method)
    est = simulate(c["h"], c["s"], c["w"], K=K, lr_theta=c["lr_theta"], lr_phi=c["lr_phi"],
                   gamma_theta=c["gamma_theta"], momentum=c["momentum"], nesterov=c["nesterov"], kind=kind,
                   path=path, steps=600, burn_in=150, runs=256, seed={"vectorized": 0, "sequential": 1}[path])
    z_mean = (est.excess_loss_mean_model - exact.excess_loss_mean_model) / est.excess_loss_mean_model_stderr
    z_members = (est.excess_loss_members - exact.excess_loss_members) / est.excess_loss_members_stderr
    assert abs(z_mean) < 4, (est, exact)
    assert abs(z_members) < 4, (est, exact)
    # the check has power: the members' excess is well separated from the mean model's
    gap = exact.excess_loss_members - exact.excess_loss_mean_model
    assert gap > 10 * est.excess_loss_members_stderr
