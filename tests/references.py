"""Exact references for bilevel toy problems, in float64 NumPy.

They are independent of the estimators (no TensorFlow) and serve as ground truth
in tests and benchmarks:

* ridge regression: closed-form w*(lambda) and d L_val / d log(lambda);
* gradient descent on a quadratic: closed-form iterate w_T and its derivatives
  with respect to per-step learning rates and a curvature hyperparameter;
* the EvoGrad 1-D toy: train (x-1)^2 + lambda x^2, val (x-0.5)^2.
"""

import numpy as np

__all__ = ["ridge_solution", "ridge_hypergradient", "quadratic_gd_iterate",
           "evograd_toy_hypergradient"]


def ridge_solution(x, y, lam):
    """w* = (X^T X / n + diag(lam))^-1 X^T y / n for
    L_train(w) = ||X w - y||^2 / (2n) + 1/2 sum_j lam_j w_j^2 (lam scalar or per feature)."""
    n, d = x.shape
    lam = np.broadcast_to(np.asarray(lam, np.float64), (d,))
    h = x.T @ x / n + np.diag(lam)
    return np.linalg.solve(h, x.T @ y / n), h


def ridge_hypergradient(x, y, x_val, y_val, lam):
    """d L_val(w*(lam)) / d log(lam), L_val(w) = ||X_v w - y_v||^2 / (2 n_v).

    IFT: dw*/dlog lam_j = -H^-1 e_j lam_j w*_j, so the per-feature hypergradient is
    -(H^-1 g_val)_j lam_j w*_j; for a scalar lam it is the sum over j.
    Returns (hypergradient shaped like lam, w*).
    """
    lam_arr = np.asarray(lam, np.float64)
    w, h = ridge_solution(x, y, lam_arr)
    g_val = x_val.T @ (x_val @ w - y_val) / x_val.shape[0]
    v = np.linalg.solve(h, g_val)
    per_feature = -v * np.broadcast_to(lam_arr, w.shape) * w
    return (per_feature.sum() if lam_arr.ndim == 0 else per_feature), w


def quadratic_gd_iterate(a, b, w0, learning_rates):
    """Gradient descent on L_t(w) = 1/2 w^T A w - b_t^T w with step lr_t:
    w_{t+1} = (I - lr_t A) w_t + lr_t b_t. Returns w_T.

    ``b`` is one vector (the same every step) or an array [T, d] of per-step vectors.
    """
    w = np.asarray(w0, np.float64)
    eye = np.eye(len(w))
    b = np.asarray(b, np.float64)
    for t, lr in enumerate(learning_rates):
        b_t = b[t] if b.ndim == 2 else b
        w = (eye - lr * a) @ w + lr * b_t
    return w


def evograd_toy_hypergradient(lam):
    """True d L_val / d lambda for train (x-1)^2 + lam x^2, val (x-0.5)^2:
    x* = 1/(1+lam), hence (lam - 1) / (lam + 1)^3."""
    return (lam - 1.0) / (lam + 1.0) ** 3
