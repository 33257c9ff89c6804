"""The TRB behavior policy (METHOD.md section 2).

At every prefix TRB samples from the distribution closest to the teacher inside a KL trust region around the
student:

    mu* = argmin_mu KL(mu || pi_T)  s.t.  KL(mu || pi_S) <= eps

whose solution is the normalized geometric blend

    mu_beta(a) = pi_S(a)^(1 - beta) * pi_T(a)^beta / Z_beta,   beta* = max{beta in [0, 1] : KL(mu_beta || pi_S) <= eps}.

With d = log pi_T - log pi_S and A(beta) = log sum_a pi_S(a) exp(beta d(a)):
KL(mu_beta || pi_S) = beta A'(beta) - A(beta), increasing in beta with derivative beta Var_mu[d].

All functions here are pure torch, vectorized over leading dimensions, computed in fp32 whatever the input dtype
(the solver's final feasibility guard in float64), and free of data-dependent Python control flow (so they compile)
except shortcuts that eager CPU code alone takes (`trb.core.numerics.eager_cpu`).
"""

from __future__ import annotations

import torch

from trb.core.numerics import eager_cpu, upcast

# Safeguarded Newton converges in a handful of steps on smooth rows; the count is fixed so the solver compiles to a
# static graph and covers the hard rows (near one-hot distributions whose blend flips between modes). A row's beta is
# final once it is tight (`_search`), so eager CPU code stops when all rows are, with the same betas. The tests check
# tightness against a float64 reference.
SOLVER_ITERS = 16
_LOG_BETA_MIN = -30.0  # beta below e^-30 is indistinguishable from 0 in an fp32 blend
_BETA_BELOW_ONE = 1.0 - 2.0**-24  # the largest fp32 below 1: the teacher endpoint beta = 1 is decided separately
_KL_NOISE = 1e-10  # KL values below this carry no usable slope information in fp32
_SLACK = 2e-4  # the search aims at eps (1 - _SLACK) and accepts up to eps (1 - _SLACK / 2)
_TIGHT = 5e-4  # a feasible beta whose KL is within this fraction of eps ends the search (eager CPU code)


def kl_divergence(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension, (..., V) -> (...), fp32; terms with p = 0 contribute 0."""
    p_logp = upcast(p_logp)
    q_logp = upcast(q_logp)
    p = torch.exp(p_logp)  # (..., V)
    terms = torch.where(p > 0, p * (p_logp - q_logp), 0.0)  # (..., V)
    return terms.sum(-1)


def blend_logp(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: torch.Tensor | float) -> torch.Tensor:
    """Normalized log mu_beta, (..., V) fp32. beta is a float or (...) tensor in [0, 1].

    beta = 0 returns the student's and beta = 1 the teacher's log-probs as given, including tokens the other model
    forbids; for 0 < beta < 1 only tokens both models allow have mass.
    """
    s = upcast(student_logp)  # (..., V)
    t = upcast(teacher_logp)  # (..., V)
    beta_t = torch.as_tensor(beta, dtype=s.dtype, device=s.device).expand(s.shape[:-1])[..., None]  # (..., 1)
    both = torch.isfinite(s) & torch.isfinite(t)  # (..., V)
    mixed = torch.where(both, s + beta_t * torch.where(both, t - s, 0.0), float("-inf"))  # (..., V)
    mixed = mixed - torch.logsumexp(mixed, dim=-1, keepdim=True)  # (..., V)
    return torch.where(beta_t == 0, s, torch.where(beta_t == 1, t, mixed))


def realized_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """KL(mu_beta || pi_S), (...) fp32: the trust-region budget actually spent at each position, evaluated in float64
    on the inputs renormalized in float64 (the quantity `solve_beta` keeps at or below eps), then rounded."""
    return _Exact(student_logp, teacher_logp).kl_and_slope(torch.as_tensor(beta))[0].float()


class _Path:
    """The geometric path restricted to tokens both models allow, prepared for repeated KL evaluations.

    For 0 < beta < 1 only tokens both models allow have mass: mu_beta = q exp(beta d) / Z with q the student
    renormalized on the common support and d = log pi_T - log pi_S there, and
    KL(mu_beta || pi_S) = KL(mu_beta || q) - log(student mass on the common support).
    """

    def __init__(self, student_logp: torch.Tensor, teacher_logp: torch.Tensor):
        s = upcast(student_logp)  # (..., V)
        t = upcast(teacher_logp)  # (..., V)
        both = torch.isfinite(s) & torch.isfinite(t)  # (..., V)
        s_common = torch.where(both, s, float("-inf"))  # (..., V)
        # log of the (normalized) student mass on the common support; -inf when the supports are disjoint
        self.log_mass = torch.logsumexp(s_common, dim=-1) - torch.logsumexp(s, dim=-1)  # (...)
        self.log_q = s_common - self.log_mass.clamp_min(-1e30)[..., None]  # (..., V)
        self.q = torch.exp(self.log_q)  # (..., V)
        d = torch.where(both, t - s, 0.0)  # (..., V)
        d = d - (self.q * d).sum(-1, keepdim=True)  # (..., V) centered: shifts of d leave mu_beta unchanged
        self.d = torch.where(both, d, 0.0)  # (..., V)
        self.var_q = (self.q * self.d.square()).sum(-1)  # (...) Var_q[d]

    def kl_and_var(self, beta: torch.Tensor):
        """KL(mu_beta || pi_S) and Var_{mu_beta}[d] for 0 < beta < 1, each (...).

        KL(mu || q) = sum_a q_a phi(mu_a / q_a) with phi(r) = r log r - r + 1 >= 0: a sum of non-negative terms, so
        it keeps its relative precision in fp32 even where KL is many orders below E_mu[log mu / q]. Since
        phi'(1) = 0, rounding in log Z perturbs the sum only at second order.
        """
        u = beta[..., None] * self.d  # (..., V) 0 off the common support
        log_unnormalized = self.log_q + u  # (..., V) -inf off the support
        log_z = torch.logsumexp(log_unnormalized, dim=-1, keepdim=True)  # (..., 1)
        v = u - log_z  # (..., V) log(mu / q) on the support; finite (and multiplied by q = mu = 0) off it
        mu = torch.exp(log_unnormalized - log_z)  # (..., V)
        # q phi(e^v) = v mu - (mu - q); near v = 0 the Taylor series avoids the cancellation of the two parts, and
        # where e^v would overflow (q tiny, mu not) mu - q is taken directly.
        series = v.square() * (0.5 + v * (1.0 / 3.0 + v * (0.125 + v / 30.0)))  # (..., V)
        mu_minus_q = torch.where(v > 20.0, mu - self.q, self.q * torch.expm1(v.clamp_max(20.0)))  # (..., V)
        terms = torch.where(v.abs() < 1e-2, self.q * series, v * mu - mu_minus_q)  # (..., V)
        kl = terms.sum(-1) - self.log_mass  # (...)
        mu_d = mu * self.d  # (..., V)
        mean_d = mu_d.sum(-1)  # (...)
        var_d = ((mu_d * self.d).sum(-1) - mean_d.square()).clamp_min(0.0)  # (...)
        return kl.clamp_min(0.0), var_d


class _Exact:
    """The geometric path in float64, on both inputs renormalized in float64: the reference the solver's result is
    held to (fp32 log-probs carry rounding of ~1e-7 per entry, so an fp32 KL is only good to about 1e-7 absolute,
    which at eps = 1e-4 is 0.1% of the budget)."""

    def __init__(self, student_logp: torch.Tensor, teacher_logp: torch.Tensor):
        s = student_logp.double()  # (..., V)
        t = teacher_logp.double()  # (..., V)
        self.s = s - torch.logsumexp(s, dim=-1, keepdim=True)  # (..., V)
        self.t = t - torch.logsumexp(t, dim=-1, keepdim=True)  # (..., V)
        self.both = torch.isfinite(self.s) & torch.isfinite(self.t)  # (..., V)
        self.d = torch.where(self.both, self.t - self.s, 0.0)  # (..., V)

    def kl_and_slope(self, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """KL(mu_beta || pi_S) and d log KL / d log beta = beta^2 Var_mu[d] / KL, each (...) float64."""
        b = beta.double().expand(self.s.shape[:-1])[..., None]  # (..., 1)
        mixed = torch.where(self.both, self.s + b * self.d, float("-inf"))  # (..., V)
        logits = torch.where(b == 0, self.s, torch.where(b == 1, self.t, mixed))  # (..., V) endpoints as blend_logp
        log_mu = logits - torch.logsumexp(logits, dim=-1, keepdim=True)  # (..., V)
        mu = torch.exp(log_mu)  # (..., V)
        kl = torch.where(mu > 0, mu * (log_mu - self.s), 0.0).sum(-1)  # (...)
        kl = torch.where(b[..., 0] == 0, 0.0, kl)  # (...) mu_0 is pi_S: exactly 0, not the rounding of log Z
        mean_d = (mu * self.d).sum(-1)  # (...)
        var_d = ((mu * self.d.square()).sum(-1) - mean_d.square()).clamp_min(0.0)  # (...)
        return kl, b[..., 0].square() * var_d / kl.clamp_min(1e-300)


def _guard(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: torch.Tensor, eps: torch.Tensor,
           target: torch.Tensor, check: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The final feasibility guard, in float64: where KL(mu_beta || pi_S) exceeds `check`, one Newton step in
    log beta aims at `target`; a beta that still exceeds it becomes 0 (the student, always feasible). Returns the beta
    and its float64 KL, each (...). The fp32 search lands within its rounding (~1e-7 absolute) of the budget, so the
    step is a small correction, and the fallback is a safety net for rows the step cannot fix."""
    exact = _Exact(student_logp, teacher_logp)
    kl, slope = exact.kl_and_slope(beta)  # (...) each
    over = (kl > check) & (beta > 0)  # (...)
    if not eager_cpu(over) or bool(over.any()):  # eager CPU code skips the step (and its second pass) when no row needs it
        log_step = (torch.log(kl.clamp_min(1e-300)) - torch.log(target)) / slope.clamp_min(1e-300)  # (...)
        stepped = (beta.double() * torch.exp(-log_step.clamp_min(0.0))).to(beta.dtype)  # (...) never larger
        beta = torch.where(over, stepped, beta)  # (...)
        kl, _ = exact.kl_and_slope(beta)
    feasible = (kl <= check) | (eps <= 0)  # (...)
    return torch.where(feasible, beta, torch.zeros_like(beta)), torch.where(feasible, kl, torch.zeros_like(kl))


def solve_beta(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    eps: float | torch.Tensor,
    iters: int = SOLVER_ITERS,
) -> torch.Tensor:
    """Largest beta in [0, 1] with KL(mu_beta || pi_S) <= eps, shape (...).

    student_logp, teacher_logp: (..., V) log-probabilities over the same vocabulary (any float dtype).
    eps: float or tensor broadcastable to (...), >= 0. Returns beta = 0 where eps = 0 and beta = 1 where
    KL(pi_T || pi_S) <= eps. The realized KL, evaluated in float64 on the inputs renormalized in float64
    (`realized_kl`), never exceeds eps (1 - 1e-4), so its fp32 rounding never exceeds eps either; where the
    constraint is tight it lands within max(1e-3 eps, 2e-6) below eps.
    """
    return trust_region(student_logp, teacher_logp, eps, iters)[0]


def trust_region(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    eps: float | torch.Tensor,
    iters: int = SOLVER_ITERS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`solve_beta` and the realized KL(mu_beta* || pi_S) of its result (both (...) fp32; the KL is the guard's
    float64 value, rounded), so a caller that records the budget spent needs no second pass.

    The search runs in fp32 (`_search`); its result then passes a float64 feasibility guard (`_guard`).
    """
    path = _Path(student_logp, teacher_logp)
    if isinstance(eps, torch.Tensor):
        eps_t = eps.to(device=path.q.device, dtype=path.q.dtype).expand(path.var_q.shape)  # (...)
    else:  # a fill, not a host-to-device copy: the solver can run inside a captured CUDA graph
        eps_t = torch.full_like(path.var_q, float(eps))  # (...)
    teacher_feasible = kl_divergence(teacher_logp, student_logp) <= eps_t  # (...)
    beta_star = _search(path, eps_t, teacher_feasible | (eps_t <= 0), iters)  # (...)
    beta_star = torch.where(teacher_feasible, torch.ones_like(beta_star), beta_star)  # (...)
    beta_star = torch.where(eps_t > 0, beta_star, torch.zeros_like(beta_star))  # (...)
    eps64 = eps_t.double()  # (...)
    slack = _SLACK * eps64  # (...)
    beta_star, kl = _guard(student_logp, teacher_logp, beta_star, eps64, eps64 - slack, eps64 - 0.5 * slack)
    return beta_star, kl.float()


def _search(path: _Path, eps_t: torch.Tensor, settled: torch.Tensor, iters: int) -> torch.Tensor:
    """The largest beta in the interior of the path whose fp32 KL(mu_beta || pi_S) is within eps, (...): safeguarded
    Newton (rtsafe) on f(x) = log KL(e^x) - log target, x = log beta. For small eps KL ~ beta^2 Var / 2, so f is
    nearly linear in x. A Newton step is taken when it stays inside the bracket and shrinks faster than bisection;
    otherwise the bracket is bisected in x.

    It aims a little below eps so iterates converging from either side end up feasible, and accepts a beta as feasible
    with half that margin to spare over the fp32 rounding of the KL itself. A row is done, its beta final, once it is
    `settled` (decided elsewhere: the teacher is feasible, or eps = 0) or holds a feasible beta within _TIGHT of eps,
    usually after two or three iterations on smooth rows; so a row's beta depends on its own distributions alone.
    Eager CPU code stops when every row is done; compiled and accelerator code runs all `iters` to the same betas.
    """
    slack = _SLACK * eps_t  # (...)
    log_target = torch.log((eps_t - slack).clamp_min(1e-30))  # (...)
    eps_check = eps_t - 0.5 * slack  # (...)
    tight = eps_t * (1.0 - _TIGHT)  # (...)
    early_exit = eager_cpu(eps_t)
    beta_lo = torch.zeros_like(eps_t)  # (...) the feasible end returned; KL(mu_0 || pi_S) = 0
    kl_lo = torch.zeros_like(eps_t)  # (...) its KL
    done = settled  # (...) rows whose beta_lo is final
    x_lo = torch.full_like(eps_t, _LOG_BETA_MIN)  # (...)
    x_hi = torch.zeros_like(eps_t)  # (...)
    start = 0.5 * torch.log(2.0 * eps_t / path.var_q.clamp_min(1e-30))  # (...) beta ~ sqrt(2 eps / Var_q[d])
    x = start.clamp(_LOG_BETA_MIN + 1.0, -0.7)  # (...)
    step_prev = x_hi - x_lo  # (...)
    step_prev2 = x_hi - x_lo  # (...)
    for _ in range(iters):
        beta = torch.exp(x).clamp_max(_BETA_BELOW_ONE)  # (...) the interior of the path, never the teacher endpoint
        kl, var_d = path.kl_and_var(beta)
        feasible = kl <= eps_check  # (...)
        beta_lo = torch.where(feasible & ~done, beta, beta_lo)
        kl_lo = torch.where(feasible & ~done, kl, kl_lo)
        done = done | (kl_lo >= tight)
        if early_exit and bool(done.all()):
            break
        x_lo = torch.where(feasible, x, x_lo)
        x_hi = torch.where(feasible, x_hi, x)
        slope = beta.square() * var_d / kl.clamp_min(1e-30)  # (...) d log KL / d log beta
        step = (torch.log(kl.clamp_min(1e-30)) - log_target) / slope.clamp_min(1e-30)  # (...)
        x_newton = x - step  # (...)
        take_newton = (
            (kl > _KL_NOISE)
            & torch.isfinite(x_newton)
            & (x_newton > x_lo)
            & (x_newton < x_hi)
            & (step.abs() < 0.5 * step_prev2.abs())
        )  # (...)
        x_next = torch.where(take_newton, x_newton, 0.5 * (x_lo + x_hi))  # (...)
        step_prev2 = step_prev
        step_prev = x - x_next
        x = x_next
    return beta_lo
