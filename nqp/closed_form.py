"""Closed forms derived with sympy, per coordinate.

Derivation. For SGD with step eta, momentum mu (torch convention, heavy ball or Nesterov) on one
coordinate with curvature h and target-noise variance s, the state (x = w - w*, v) is linear,

    heavy ball:  v' = mu v + h (x - sqrt(s) xi),  x' = x - eta v'
    Nesterov:    v' = mu v + h (x - sqrt(s) xi),  x' = x - eta (h (x - sqrt(s) xi) + mu v')

and sympy solves the 2x2 discrete Lyapunov equation Sigma = A Sigma A^T + B B^T symbolically for the
stationary variance V(eta, h, s, mu) = Var(x). The stability edge is where V diverges (a root of
its denominator).

Additive late-phase learning reduces exactly to two SGD problems. Write phi_k = phibar + delta_k
(sum_k delta_k = 0), and the mean model m = theta + phibar. One outer step gives

    m'       = m - (eta_phi + K gamma_theta eta_theta) h (m - xbar),     xbar ~ N(w*, s/K)
    delta_k' = delta_k - eta_phi h (delta_k - (c_k - cbar)),

(momentum: the combined buffer (eta_theta v_theta + eta_phi vbar_phi) / eta_eff is m's buffer), so the
mean model is SGD with eta_eff = eta_phi + K gamma_theta eta_theta and noise s/K (a K-times batch),
each member's deviation is SGD with eta_phi and noise s (1 - 1/K), the two are uncorrelated, and

    E_mean    = h/2 V(eta_phi + K gamma_theta eta_theta, h, s/K, mu)
    E_members = E_mean + h/2 V(eta_phi, h, s (1 - 1/K), mu).

The multiplicative model linearised about its balanced optimum (theta = phi = sqrt|w*|) is the
additive one with both rates multiplied by |w*| (its small-noise prediction).
The tail average of n consecutive stationary SGD iterates (mu = 0, rho = 1 - eta h) has variance
V [n (1 + rho)/(1 - rho) - 2 rho (1 - rho^n)/(1 - rho)^2] / n^2.

For the balance of the multiplicative model (:mod:`nqp.balance`) the same 2x2 solution gives the stationary
second moment of SGD's update direction D = -(x' - x)/eta and of its product with the new buffer v',

    q(a, mu) = (E[D^2] + c E[D v']) / (h^2 s),   c = 0 (plain), 2 mu/(1 - mu) (heavy ball), 2 mu^2/(1 - mu) (Nesterov),

a function of a = eta h and mu only (plain SGD: q = 2/(2 - a); every variant: q -> 1/(1 - mu)^2 as a -> 0).

Speed. The derivations run in sympy once, at code-generation time (`python -m nqp.codegen` writes
`nqp/_closed_forms.py`); the numeric functions below call that generated numpy code, so importing and
evaluating them does not import sympy. `tests/test_nqp_exact.py` checks the generated code against sympy.
"""
from __future__ import annotations

import functools

import numpy as np

VARIANTS = ("plain", "heavy", "nesterov")


def variant_of(momentum: float, nesterov: bool) -> str:
    return "plain" if not momentum else ("nesterov" if nesterov else "heavy")


@functools.cache
def _symbols():
    import sympy as sp
    return {
        "eta": sp.Symbol("eta", positive=True),
        "h": sp.Symbol("h", positive=True),
        "s": sp.Symbol("s", nonnegative=True),
        "mu": sp.Symbol("mu", nonnegative=True),
        "K": sp.Symbol("K", positive=True, integer=True),
        "gamma": sp.Symbol("gamma_theta", nonnegative=True),
        "eta_theta": sp.Symbol("eta_theta", nonnegative=True),
        "eta_phi": sp.Symbol("eta_phi", positive=True),
        "n": sp.Symbol("n", positive=True, integer=True),
    }


def sgd_matrices(variant: str):
    """Symbolic (A, B) of one SGD step on (x, v) (heavy/Nesterov) or x (plain); xi ~ N(0, 1)."""
    import sympy as sp
    S = _symbols()
    eta, h, s, mu = S["eta"], S["h"], S["s"], S["mu"]
    rs = sp.sqrt(s)
    if variant == "plain":
        return sp.Matrix([[1 - eta * h]]), sp.Matrix([[eta * h * rs]])
    if variant == "heavy":
        # v' = mu v + h x - h rs xi ; x' = x - eta v'
        return (sp.Matrix([[1 - eta * h, -eta * mu], [h, mu]]),
                sp.Matrix([[eta * h * rs], [-h * rs]]))
    # Nesterov: x' = x - eta (g + mu v') = x - eta (1 + mu) g - eta mu^2 v
    return (sp.Matrix([[1 - eta * h * (1 + mu), -eta * mu ** 2], [h, mu]]),
            sp.Matrix([[eta * h * (1 + mu) * rs], [-h * rs]]))


@functools.cache
def sgd_variance_expr(variant: str):
    """Stationary Var(w - w*) of SGD, solved symbolically from Sigma = A Sigma A^T + B B^T."""
    import sympy as sp
    return sp.factor(sp.simplify(_stationary_covariance(variant)[0, 0]))


@functools.cache
def variance_factor_expr(variant: str):
    """g(a, mu) with V(eta, h, s, mu) = s g(eta h, mu): the variance depends on eta and h only through
    the dimensionless step a = eta h (h cancels when eta = a / h is substituted)."""
    import sympy as sp
    S = _symbols()
    a = sp.Symbol("a", positive=True)
    g = sp.factor(sp.simplify(sgd_variance_expr(variant).subs(S["eta"], a / S["h"]) / S["s"]))
    assert g.free_symbols <= {a, S["mu"]}, g
    return g, a


@functools.cache
def stability_bound_expr(variant: str):
    """Largest stable eta*h: the positive root (in eta h) of V's denominator.
    plain: 2; heavy ball: 2 (1 + mu); Nesterov: 2 (1 + mu) / (1 + 2 mu)."""
    import sympy as sp
    S = _symbols()
    a = sp.Symbol("a", positive=True)
    V = sgd_variance_expr(variant).subs(S["eta"], a / S["h"])
    den = sp.denom(sp.together(V))
    roots = []
    for fac in sp.factor_list(den)[1]:
        f = fac[0]
        if f.has(a):
            roots += [r for r in sp.solve(f, a) if r.is_positive is not False]
    # The edge reached first as eta h grows from 0 (the others lie beyond it for 0 <= mu < 1).
    candidates = [sp.simplify(r) for r in roots if r.subs(S["mu"], sp.Rational(1, 3)) > 0]
    return min(candidates, key=lambda r: float(r.subs(S["mu"], sp.Rational(1, 3))))


@functools.cache
def tail_average_factor_expr():
    """Var(average of n stationary SGD iterates) / V for mu = 0, rho = 1 - eta h."""
    import sympy as sp
    S = _symbols()
    n = S["n"]
    rho, tau = sp.Symbol("rho", real=True), sp.Symbol("tau", integer=True, positive=True)
    total = n + 2 * sp.summation((n - tau) * rho ** tau, (tau, 1, n - 1))
    return sp.simplify(total / n ** 2), rho


@functools.cache
def drift_moment_expr(variant: str):
    """q(a, mu) = (E[D^2] + c E[D v']) / (h^2 s) for stationary SGD (state (x, v), or x when mu = 0), with the
    update direction D = -(x' - x)/eta and the new buffer v'; c = 0 (plain), 2 mu/(1 - mu) (heavy ball),
    2 mu^2/(1 - mu) (Nesterov). Solved from Sigma = A Sigma A^T + B B^T:
    E[D^2] = [(A - I) Sigma (A - I)^T + B B^T]_xx / eta^2, E[D v'] = -[(A - I) Sigma A^T + B B^T]_xv / eta."""
    import sympy as sp
    S = _symbols()
    eta, h, s, mu = S["eta"], S["h"], S["s"], S["mu"]
    a = sp.Symbol("a", positive=True)
    A, B = sgd_matrices(variant)
    n = A.shape[0]
    Sig = _stationary_covariance(variant)
    eye = sp.eye(n)
    q = ((A - eye) * Sig * (A - eye).T + B * B.T)[0, 0] / eta ** 2
    if n > 1:
        c = 2 * mu / (1 - mu) if variant == "heavy" else 2 * mu ** 2 / (1 - mu)
        q += c * (-((A - eye) * Sig * A.T + B * B.T)[0, 1] / eta)
    q = sp.factor(sp.simplify((q / (h ** 2 * s)).subs(eta, a / h)))
    assert q.free_symbols <= {a, mu}, q
    return q, a


@functools.cache
def _stationary_covariance(variant: str):
    """The symbolic stationary covariance of (x, v) (or x) of one SGD coordinate."""
    import sympy as sp
    A, B = sgd_matrices(variant)
    n = A.shape[0]
    syms = sp.symbols(f"q0:{n * (n + 1) // 2}")
    it = iter(syms)
    Sig = sp.zeros(n, n)
    for i in range(n):
        for j in range(i, n):
            Sig[i, j] = Sig[j, i] = next(it)
    eqs = Sig - A * Sig * A.T - B * B.T
    sol = sp.solve([eqs[i, j] for i in range(n) for j in range(i, n)], syms, dict=True)[0]
    return Sig.subs(sol)


def generated_expressions() -> dict:
    """The sympy expressions compiled into nqp/_closed_forms.py: name -> (expression, argument symbols)."""
    import sympy as sp
    S = _symbols()
    out = {}
    for v in VARIANTS:
        out[f"sgd_variance_{v}"] = (sgd_variance_expr(v), (S["eta"], S["h"], S["s"], S["mu"]))
        g, a = variance_factor_expr(v)
        out[f"variance_factor_{v}"] = (g, (a, S["mu"]))
        out[f"stability_edge_{v}"] = (stability_bound_expr(v), (S["mu"],))
        q, a = drift_moment_expr(v)
        out[f"drift_moment_{v}"] = (q, (a, S["mu"]))
        out[f"drift_moment_slope_{v}"] = (sp.factor(sp.diff(q, a)), (a, S["mu"]))
    return out


def _generated(name: str, variant: str):
    from . import _closed_forms
    return getattr(_closed_forms, f"{name}_{variant}")


# ----------------------------------------------------------------------------- numeric closed forms

def sgd_variance(lr, h, s, momentum: float = 0.0, nesterov: bool = False):
    """V(eta, h, s, mu): stationary variance of w_i - w*_i under SGD (units: weight^2), vectorised."""
    f = _generated("sgd_variance", variant_of(momentum, nesterov))
    lr, h, s = np.broadcast_arrays(np.asarray(lr, float), np.asarray(h, float), np.asarray(s, float))
    return np.asarray(f(lr, h, s, float(momentum)), dtype=float) * np.ones_like(lr)


def variance_factor(a, momentum: float = 0.0, nesterov: bool = False):
    """g(a, mu) = V / s at the dimensionless step a = eta h (vectorised; plain SGD: a / (2 - a))."""
    a = np.asarray(a, float)
    return np.asarray(_generated("variance_factor", variant_of(momentum, nesterov))(a, float(momentum)),
                      float) * np.ones_like(a)


def drift_moment(a, momentum: float = 0.0, nesterov: bool = False, slope: bool = False):
    """q(a, mu) = (E[D^2] + c E[D v']) / (h^2 s) of stationary SGD at a = eta h (dimensionless; see the module
    docstring), or its derivative dq/da with slope=True. Accepts complex a (rational function)."""
    f = _generated("drift_moment_slope" if slope else "drift_moment", variant_of(momentum, nesterov))
    a = np.asarray(a)
    q = f(a, float(momentum))
    # broadcast only where the expression does not (a constant); the root finder of the sweep calls this in its loop
    return q if np.shape(q) == a.shape else q * np.ones_like(a)


def stability_edge(momentum: float = 0.0, nesterov: bool = False) -> float:
    """Largest stable value of eta * h for SGD with this momentum (exclusive bound)."""
    return float(_generated("stability_edge", variant_of(momentum, nesterov))(float(momentum)))


def tail_average_factor(rho, n):
    """Var(mean of n consecutive stationary iterates) / V for plain SGD with rho = 1 - eta h:

        F = 1/n + 2 rho N / (n^2 eps^2),   eps = 1 - rho,   N = n eps - (1 - rho^n)

    (the sympy sum of :func:`tail_average_factor_expr`). For 0 < eps < 1/2, N is evaluated without cancellation as
    N = n (eps - L) + (n L)^2 phi(n L) with L = -log(1 - eps) (so rho^n = exp(-n L)),
    eps - L = eps + log1p(-eps) by its series and phi(x) = (x - 1 + exp(-x)) / x^2 by its series for small x;
    the direct formula would lose digits like 1/(n eps) as eta h -> 0."""
    rho = np.asarray(rho, float)
    n = np.asarray(n, float)
    rho, n = np.broadcast_arrays(rho, n)
    eps = 1.0 - rho
    out = np.ones(rho.shape)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        direct = (n * (1 - rho ** 2) - 2 * rho * (1 - rho ** n)) / (n ** 2 * eps ** 2)
        small = (eps > 0) & (eps < 0.5)
        e = np.where(small, eps, 0.25)
        L = -np.log1p(-e)
        # eps - L = -(eps^2/2 + eps^3/3 + ...): by its series below eps = 0.05, directly above (< 2 digits lost).
        k = np.arange(2, 16)
        series = -np.sum(e[..., None] ** k / k, axis=-1)
        e_minus_L = np.where(e < 0.05, series, e + np.log1p(-e))
        x = n * L
        xs = np.where(x < 0.05, x, 0.0)
        # phi(x) = sum_{j >= 0} (-x)^j / (j + 2)!
        fact = np.cumprod(np.arange(2, 14, dtype=float))
        phi_series = np.sum((-xs[..., None]) ** np.arange(12) / fact, axis=-1)
        phi = np.where(x < 0.05, phi_series, (x + np.expm1(-x)) / np.where(x > 0, x, 1.0) ** 2)
        N = n * e_minus_L + x * x * phi
        stable = 1 / n + 2 * rho * N / (n ** 2 * e ** 2)
        val = np.where(small, stable, direct)
    keep = (eps != 0) & (n > 1)
    out[keep] = val[keep]
    return out


def sgd_excess(lr, h, s, momentum=0.0, nesterov=False):
    """Per-coordinate stationary excess loss of SGD: h/2 V(eta, h, s, mu) (units: loss)."""
    return 0.5 * np.asarray(h) * sgd_variance(lr, h, s, momentum, nesterov)


def additive_excess(K, gamma_theta, lr_theta, lr_phi, h, s, momentum=0.0, nesterov=False):
    """Per-coordinate stationary excess of additive late-phase learning (arrays broadcast):

        E_mean    = h/2 V(eta_phi + K gamma_theta eta_theta, h, s/K, mu)
        E_members = E_mean + h/2 V(eta_phi, h, s (1 - 1/K), mu).
    Returns (E_mean, E_members) in loss units."""
    K = np.asarray(K, float)
    lr_eff = np.asarray(lr_phi) + K * np.asarray(gamma_theta) * np.asarray(lr_theta)
    e_mean = sgd_excess(lr_eff, h, np.asarray(s) / K, momentum, nesterov)
    e_dev = sgd_excess(lr_phi, h, np.asarray(s) * (1 - 1 / K), momentum, nesterov)
    return e_mean, e_mean + e_dev


# ----------------------------------------------------------------------------- LaTeX

@functools.cache
def latex() -> dict:
    """The derived formulas as LaTeX strings (generated by sympy, for the docs)."""
    import sympy as sp
    S = _symbols()
    eta, h, s, mu, K, g = S["eta"], S["h"], S["s"], S["mu"], S["K"], S["gamma"]
    et, ep = S["eta_theta"], S["eta_phi"]
    names = {eta: r"\eta", et: r"\eta_\theta", ep: r"\eta_\phi", g: r"\gamma_\theta", mu: r"\mu"}
    tex = functools.partial(sp.latex, symbol_names=names)
    out = {}
    for v in VARIANTS:
        V = sgd_variance_expr(v)
        out[f"sgd_variance_{v}"] = tex(V)
        out[f"stability_{v}"] = tex(stability_bound_expr(v))
        A, B = sgd_matrices(v)
        out[f"sgd_A_{v}"], out[f"sgd_B_{v}"] = tex(A), tex(B)
        eff = ep + K * g * et
        e_mean = sp.factor(h / 2 * V.subs({eta: eff, s: s / K}, simultaneous=True))
        e_dev = sp.factor(h / 2 * V.subs({eta: ep, s: s * (1 - 1 / K)}, simultaneous=True))
        out[f"additive_mean_{v}"] = tex(e_mean)
        out[f"additive_deviation_{v}"] = tex(e_dev)
        q, a = drift_moment_expr(v)
        out[f"drift_moment_{v}"] = tex(q)
    fac, rho = tail_average_factor_expr()
    out["tail_average_factor"] = sp.latex(fac, symbol_names={rho: r"\rho"})
    return out
