"""Empirical privacy audit of a finished run: membership inference against the final model.

The attacker gets the final global model and as many *members* (rows that clients trained
on) as *non-members* (the server's held-out test rows, matched to the members client by
client and class by class, and encoded the way those clients encoded their own rows) and
has to tell them apart. Two attacks:

- `loss-threshold` (Yeom et al., "Privacy Risk in Machine Learning: Analyzing the Connection
  to Overfitting", CSF 2018): score = −cross-entropy of the true label; members tend to have
  lower loss.
- `class-calibrated`: an offline, global-variance variant of LiRA (Carlini et al.,
  "Membership Inference Attacks From First Principles", S&P 2022). The logit-confidence
  φ = log p_y − log(1 − p_y) is standardised with a Gaussian fitted per class on *reference*
  non-members, test rows disjoint from those scored, so that classes that are hard for every
  row do not drown the signal. It runs only when enough reference rows are left over.

Every threshold τ on a score is a test "member iff score ≥ τ"; (ε, δ)-DP bounds its error
rates: TPR ≤ e^ε·FPR + δ and 1 − FPR ≤ e^ε·(1 − TPR) + δ. With one-sided Clopper–Pearson
bounds on TPR and FPR this gives the empirical lower bound (Jagielski et al., "Auditing
Differentially Private Machine Learning: How Private is Private SGD?", NeurIPS 2020; Nasr et
al., "Adversary Instantiation: Lower Bounds for Differentially Private Machine Learning",
S&P 2021)

    ε_lb = max over τ of max(log((TPR_low − δ) / FPR_high),
                             log((1 − FPR_high − δ) / (1 − TPR_low)))

clipped at 0. What the number means:

- It holds **per example**: the guarantee being tested is about one row, and every scored row
  is one trial of the same hypothesis test. Treating the rows as independent trials assumes
  members and non-members come from the same distribution (a random train/test split);
  a test file from elsewhere can make non-members look different for reasons that have
  nothing to do with training, and inflate the bound.
- The 95% confidence is **simultaneous** over all thresholds and attacks: the max over
  thresholds would otherwise be the most optimistic of hundreds of 95% bounds. For TPR the
  failure of the bound at any threshold is the failure at one of the m order statistics of
  the member scores (likewise for FPR), so a union bound over m + n events per attack keeps
  the overall confidence at 95%.
- With m rows of each kind it cannot exceed about log(m): even a perfect attack has
  FPR_high ≈ ln((m + n)/0.05)/m. That ceiling is reported as `max_measurable_epsilon`; a run
  whose ε is above it cannot be audited tightly with this many rows.
- It is a *lower* bound from two particular attacks against the final model only (not the
  per-round updates the ε also covers). Real models are typically far from the worst case,
  so ε_lb far below ε is the expected outcome, not a sign of slack in the accounting. An
  ε_lb above the accounted ε, on the other hand, contradicts the guarantee: a bug, which is
  reported as `violation`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from scipy.stats import beta
from sklearn.metrics import roc_auc_score, roc_curve

from privet.common import results
from privet.common.config import ExperimentConfig, load_config
from privet.common.data import datasets, federated
from privet.common.models import build_model

log = logging.getLogger(__name__)  # propagates: a violation reaches any console

CONFIDENCE = 0.95
FPR_TARGETS = (0.01, 0.001)
MIN_REFERENCE_PER_CLASS = 10  # fewer reference rows of a class: use the pooled Gaussian
REGRESSION_REFUSED = (
    "train.task = \"regression\": not audited: both attacks score a class's probability and "
    "match members to non-members class by class; a regression attack (squared error, "
    "matched by label quantile) is not written yet")


# ---------------------------------------------------------------- the statistics

def _clopper_pearson(tp: np.ndarray, fp: np.ndarray, m: int, n: int, a: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One-sided (1 − a) bounds: TPR ≥ low from tp of m, FPR ≤ high from fp of n."""
    tp, fp = np.asarray(tp, dtype=float), np.asarray(fp, dtype=float)
    low = np.where(tp > 0, beta.ppf(a, np.maximum(tp, 1), m - tp + 1), 0.0)
    high = np.where(fp < n, beta.ppf(1 - a, fp + 1, np.maximum(n - fp, 1)), 1.0)
    return low, high


def _epsilon_from_counts(tp, fp, m: int, n: int, delta: float, a: float) -> float:
    tpr_low, fpr_high = _clopper_pearson(tp, fp, m, n, a)
    with np.errstate(divide="ignore", invalid="ignore"):
        direct = np.log((tpr_low - delta) / fpr_high)
        complement = np.log((1 - fpr_high - delta) / (1 - tpr_low))
    values = np.concatenate([np.atleast_1d(direct), np.atleast_1d(complement)])
    values = values[np.isfinite(values)]  # numerator ≤ 0: that threshold proves nothing
    return max(0.0, float(values.max())) if values.size else 0.0


def _per_test_level(m: int, n: int, confidence: float, attacks: int) -> float:
    """Union bound: m + n order statistics per attack (see the module docstring)."""
    return (1 - confidence) / (attacks * (m + n))


def epsilon_lower_bound(member_scores, non_member_scores, delta: float, *,
                        confidence: float = CONFIDENCE, attacks: int = 1) -> float:
    """Empirical ε lower bound from one attack's scores (higher score = "member").

    Valid with probability `confidence` simultaneously over every threshold and over
    `attacks` attacks whose bounds are maximised together.
    """
    members = np.asarray(member_scores, dtype=float)
    non_members = np.asarray(non_member_scores, dtype=float)
    m, n = len(members), len(non_members)
    if m == 0 or n == 0:
        return 0.0
    thresholds = np.unique(np.concatenate([members, non_members]))
    # rows at or above each threshold
    tp = m - np.searchsorted(np.sort(members), thresholds, side="left")
    fp = n - np.searchsorted(np.sort(non_members), thresholds, side="left")
    return _epsilon_from_counts(tp, fp, m, n, delta,
                                _per_test_level(m, n, confidence, attacks))


def max_measurable_epsilon(m: int, n: int, delta: float, *, confidence: float = CONFIDENCE,
                           attacks: int = 1) -> float:
    """The bound a perfect attack would get with m members and n non-members (≈ log m)."""
    if m == 0 or n == 0:
        return 0.0
    return _epsilon_from_counts(m, 0, m, n, delta, _per_test_level(m, n, confidence, attacks))


def tpr_at_fpr(member_scores, non_member_scores, fpr_target: float) -> float:
    """The largest TPR among thresholds whose FPR is at most `fpr_target`."""
    labels = np.r_[np.ones(len(member_scores)), np.zeros(len(non_member_scores))]
    fpr, tpr, _ = roc_curve(labels, np.r_[member_scores, non_member_scores])
    return float(tpr[fpr <= fpr_target].max())


# ---------------------------------------------------------------- the run

def _require_run(run_dir: Path) -> dict:
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: no such run directory")
    missing = [f for f in (results.CONFIG, results.SUMMARY) if not (run_dir / f).is_file()]
    if missing:
        raise ValueError(f"{run_dir}: not a privet run directory (no {', '.join(missing)})")
    if not (run_dir / results.MODEL).is_file():
        raise ValueError(f"{run_dir}: no {results.MODEL}: the run finished no round, so there "
                         "is no model to audit")
    try:
        summary = results.read_summary(run_dir)
        summary["privacy"]["clients"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{run_dir}: {results.SUMMARY} is not a privet summary ({err!r})"
                         ) from None
    return summary


def _member_clients(summary: dict, run_dir: Path) -> list[int]:
    clients = sorted(int(cid) for cid, c in summary["privacy"]["clients"].items()
                     if c.get("rounds_trained", 0) > 0)
    if not clients:
        raise ValueError(f"{run_dir}: no client trained in this run, so there are no members "
                         "to audit")
    return clients


def _theoretical_epsilon(cfg: ExperimentConfig, summary: dict, clients: list[int]
                         ) -> float | None:
    """The largest sample-level ε a member row is protected by; None if any member client
    (or the whole run) has no sample-level DP."""
    if not cfg.private:
        return None
    spent = [summary["privacy"]["clients"][str(c)].get("epsilon") for c in clients]
    if any(e is None or not math.isfinite(e) for e in spent):
        return None
    return float(max(spent))


def _allocate(total: int, weights: np.ndarray) -> np.ndarray:
    """Split `total` into integer parts proportional to `weights` (largest remainder)."""
    share = total * weights / weights.sum()
    parts = np.floor(share).astype(int)
    parts[np.argsort(parts - share)[: total - parts.sum()]] += 1
    return parts


def _draw(member_labels: list[np.ndarray], test_labels: np.ndarray, max_rows: int,
          rng: np.random.Generator
          ) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Per member client: its rows to score, the test rows scored as its non-members, and
    the reference test rows encoded as it encodes.

    Non-members are matched to members client by client *and* class by class. With locally
    fitted transforms each client's encoding then appears equally often on both sides, and
    a client's label skew cannot pass for membership; nor can a train/test label shift.
    """
    pool_y = np.concatenate(member_labels)
    owner = np.concatenate([np.full(len(y), i) for i, y in enumerate(member_labels)])
    within = np.concatenate([np.arange(len(y)) for y in member_labels])
    classes = np.unique(pool_y)
    classes = classes[np.isin(classes, test_labels)]  # a class the test set lacks: unmatched
    pool_count = np.array([np.sum(pool_y == c) for c in classes])
    test_count = np.array([np.sum(test_labels == c) for c in classes])
    # the most rows whose class mix the test rows can match
    fits = (int(np.floor(np.min(test_count * pool_count.sum() / pool_count)))
            if len(classes) else 0)
    total = min(max_rows, int(pool_count.sum()), fits)
    per_class = (np.minimum(_allocate(total, pool_count), test_count) if total
                 else np.zeros(len(classes), dtype=int))
    clients = len(member_labels)
    members, scored, spare = ([[] for _ in range(clients)] for _ in range(3))
    spare_weights = []
    for c, k in zip(classes, per_class):
        picked = rng.choice(np.flatnonzero(pool_y == c), size=k, replace=False)
        counts = np.bincount(owner[picked], minlength=clients)
        tests = rng.permutation(np.flatnonzero(test_labels == c))
        start = 0
        for i in range(clients):
            members[i].append(within[picked[owner[picked] == i]])
            scored[i].append(tests[start:start + counts[i]])
            start += counts[i]
        spare.append(tests[start:])
        spare_weights.append(np.repeat(counts[None, :] / max(k, 1), len(tests) - start, 0))
    reference = [[] for _ in range(clients)]
    spare_rows, weights = np.concatenate(spare), np.concatenate(spare_weights)
    keep = rng.permutation(len(spare_rows))[:max_rows]
    for row, w in zip(spare_rows[keep], weights[keep]):
        if w.sum() > 0:  # a class no member has: not needed
            reference[rng.choice(clients, p=w)].append(row)
    cat = np.concatenate
    return ([cat(x).astype(int) for x in members], [cat(x).astype(int) for x in scored],
            [np.asarray(x, dtype=int) for x in reference])


def _encode_test(cfg: ExperimentConfig, clients: list[int], rows: list[np.ndarray],
                 transforms: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
    """Test rows `rows[i]` encoded as client `clients[i]` encoded its own rows (`transforms`:
    each client's transform JSON; "" = its exact fit on its own rows)."""
    shared = {transforms.get(c, "") for c in clients}
    if not cfg.data.tabular or (len(shared) == 1 and next(iter(shared))
                                and cfg.federated_preprocessing):
        test = datasets.test_data(cfg, next(iter(shared)) if shared else "")
        order = np.concatenate(rows)
        return test.features[order], test.labels[order]
    frame, labels = datasets.test_rows(cfg)
    features = [datasets.client_transform(cfg, c, transforms.get(c, "")).apply(frame.iloc[r])
                for c, r in zip(clients, rows) if len(r)]
    return np.concatenate(features), labels[np.concatenate(rows)]


def client_transforms(cfg: ExperimentConfig, run_dir: Path, clients: list[int]
                      ) -> dict[int, str]:
    """The transform each client encoded its rows with: the shared one (transform.json), the
    one it fitted with DP itself and sent (client_transforms.json), or "" for an exact fit on
    its own rows (a client without sample-level DP). Raises ValueError when one is missing."""
    if not cfg.data.tabular:
        return {c: "" for c in clients}
    if cfg.federated_preprocessing:
        path = run_dir / results.TRANSFORM
        if not path.is_file():
            raise ValueError(f"{run_dir}: preprocess.fit = \"federated\" but no "
                             f"{results.TRANSFORM}: cannot encode rows as the clients did")
        text = path.read_text(encoding="utf-8")
        return {c: text for c in clients}
    path = run_dir / results.CLIENT_TRANSFORMS
    own = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    table = datasets.schema(cfg)
    kinds = {c: federated.fit_kind(cfg, c, table) for c in clients}
    missing = [c for c in clients if kinds[c] == "private" and str(c) not in own]
    if missing:
        raise ValueError(f"{run_dir}: no {results.CLIENT_TRANSFORMS} entry for client(s) "
                         f"{missing}: cannot encode rows as they did")
    public = federated.fit_public(table, cfg.preprocess).to_json() if "public" in \
        kinds.values() else ""
    return {c: json.dumps(own[str(c)]) if kinds[c] == "private" else
            public if kinds[c] == "public" else "" for c in clients}


def _test_labels(cfg: ExperimentConfig) -> np.ndarray:
    if not cfg.data.tabular:
        return datasets.test_data(cfg).labels
    return datasets.test_rows(cfg)[1]


def _load_model(cfg: ExperimentConfig, run_dir: Path, input_shape: tuple[int, ...],
                features=None) -> torch.nn.Module:
    model = build_model(cfg.train, input_shape, datasets.num_classes(cfg), features)
    state = torch.load(run_dir / results.MODEL, map_location="cpu")
    model.load_state_dict(state["state_dict"])
    return model.eval()


@torch.no_grad()
def _log_probs(model: torch.nn.Module, features: np.ndarray) -> np.ndarray:
    """Log-softmax in float64: an overfit model's losses underflow to ties in float32."""
    out = [model(torch.from_numpy(np.ascontiguousarray(chunk))).double().log_softmax(1)
           for chunk in np.array_split(features, max(1, math.ceil(len(features) / 4096)))]
    return torch.cat(out).numpy()


def _logit_confidence(log_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """φ = log p_y − log(1 − p_y), stable for p_y near 1 (the LiRA statistic)."""
    log_py = log_probs[np.arange(len(labels)), labels]
    return log_py - np.log(-np.expm1(np.minimum(log_py, -1e-300)))


def _calibrated(phi: np.ndarray, labels: np.ndarray, ref_phi: np.ndarray,
                ref_labels: np.ndarray) -> np.ndarray:
    """(φ − μ_y) / σ_y with a Gaussian per class fitted on the reference non-members."""
    pooled = (ref_phi.mean(), max(ref_phi.std(), 1e-12))
    stats = {}
    for c in np.unique(labels):
        own = ref_phi[ref_labels == c]
        stats[c] = ((own.mean(), max(own.std(), 1e-12))
                    if len(own) >= MIN_REFERENCE_PER_CLASS else pooled)
    mu = np.array([stats[c][0] for c in labels])
    sigma = np.array([stats[c][1] for c in labels])
    return (phi - mu) / sigma


def _attack_result(members: np.ndarray, non_members: np.ndarray, delta: float,
                   attacks: int) -> dict:
    labels = np.r_[np.ones(len(members)), np.zeros(len(non_members))]
    return {"auc": float(roc_auc_score(labels, np.r_[members, non_members])),
            "tpr_at_fpr": {str(t): tpr_at_fpr(members, non_members, t) for t in FPR_TARGETS},
            "epsilon_lower_bound": epsilon_lower_bound(members, non_members, delta,
                                                       attacks=attacks)}


def audit_run(run_dir: str | Path, *, max_rows: int = 5000, seed: int = 0) -> dict:
    """Membership inference against the run's final global model; writes RUN_DIR/audit.json.

    Members: up to `max_rows` rows drawn at random (`seed`) from the clients that trained at
    least once, as each encoded them. Non-members: as many held-out test rows, drawn at
    random and matched to the members client by client and class by class, each encoded as
    its client encoded its own rows (see `_draw`). Test rows left over, up to `max_rows`, are
    the reference set of the calibrated attack. Raises ValueError when `run_dir` is not a
    privet run directory or has no model, or for a regression run (REGRESSION_REFUSED).
    Returns the JSON-able report.
    """
    run_dir = Path(run_dir)
    summary = _require_run(run_dir)
    cfg = load_config(run_dir / results.CONFIG)
    if cfg.regression:
        raise ValueError(REGRESSION_REFUSED)
    clients = _member_clients(summary, run_dir)
    transforms = client_transforms(cfg, run_dir, clients)
    rng = np.random.default_rng(seed)

    member_data = [datasets.client_data(cfg, c, transforms[c]) for c in clients]
    member_rows, scored_rows, reference_rows = _draw(
        [d.labels for d in member_data], _test_labels(cfg), max_rows, rng)
    m = sum(map(len, member_rows))
    if m == 0:
        raise ValueError(f"{run_dir}: no test rows of the members' classes to audit with")
    member_x = np.concatenate([d.features[r] for d, r in zip(member_data, member_rows)])
    member_y = np.concatenate([d.labels[r] for d, r in zip(member_data, member_rows)])
    scored_x, scored_y = _encode_test(cfg, clients, scored_rows, transforms)
    n_ref = sum(map(len, reference_rows))

    model = _load_model(cfg, run_dir, tuple(member_x.shape[1:]), member_data[0].feature_spec)
    member_lp, non_lp = _log_probs(model, member_x), _log_probs(model, scored_x)
    member_loss_score = member_lp[np.arange(m), member_y]  # −cross-entropy
    non_loss_score = non_lp[np.arange(m), scored_y]

    delta = float(summary["privacy"]["delta"])
    use_reference = n_ref >= 2 * MIN_REFERENCE_PER_CLASS
    attacks = 2 if use_reference else 1
    found = {"loss-threshold": _attack_result(member_loss_score, non_loss_score, delta,
                                              attacks)}
    if use_reference:
        ref_x, ref_y = _encode_test(cfg, clients, reference_rows, transforms)
        ref_phi = _logit_confidence(_log_probs(model, ref_x), ref_y)
        found["class-calibrated"] = _attack_result(
            _calibrated(_logit_confidence(member_lp, member_y), member_y, ref_phi, ref_y),
            _calibrated(_logit_confidence(non_lp, scored_y), scored_y, ref_phi, ref_y),
            delta, attacks)
    best = max(found, key=lambda k: (found[k]["epsilon_lower_bound"], k == "loss-threshold"))

    theoretical = _theoretical_epsilon(cfg, summary, clients)
    user = (summary["privacy"].get("user_level") or {}).get("epsilon")
    report = {
        "attack": best, "members": m, "non_members": m, "reference_rows": n_ref
        if use_reference else 0,
        "auc": found[best]["auc"], "tpr_at_fpr": found[best]["tpr_at_fpr"],
        "epsilon_lower_bound": found[best]["epsilon_lower_bound"],
        "max_measurable_epsilon": max_measurable_epsilon(m, m, delta, attacks=attacks),
        "confidence": CONFIDENCE, "delta": delta,
        "theoretical_epsilon": theoretical, "user_level_epsilon": user,
        "attacks": found, "member_clients": clients, "rounds": summary.get("rounds"),
        "seed": seed,
    }
    report["violation"], report["message"] = _verdict(report, cfg, summary, clients)
    if report["violation"]:
        log.warning("privacy audit of %s: %s", run_dir, report["message"])
    results.write_json(run_dir / results.AUDIT, report)
    return report


def _verdict(report: dict, cfg: ExperimentConfig, summary: dict, clients: list[int]
             ) -> tuple[bool, str]:
    eps_lb, theoretical = report["epsilon_lower_bound"], report["theoretical_epsilon"]
    found = (f"{report['attack']} attack: AUC {report['auc']:.3f}, empirical ε ≥ "
             f"{eps_lb:.3f} at {report['confidence']:.0%} confidence (at most "
             f"{report['max_measurable_epsilon']:.2f} measurable with {report['members']} "
             f"rows each)")
    status = summary.get("status", "unknown")
    suffix = "" if status == "complete" else f" (run status: {status})"
    if theoretical is not None:
        if eps_lb > theoretical:
            return True, (f"VIOLATION: {found} exceeds the accounted sample-level ε = "
                          f"{theoretical:.3f}: the guarantee cannot hold as reported (a bug "
                          "in clipping, noise, sampling or accounting), unless the test rows "
                          f"come from another distribution than the training rows{suffix}")
        return False, f"{found}; below the accounted sample-level ε = {theoretical:.3f}{suffix}"
    if cfg.private:
        nondp = [c for c in clients
                 if summary["privacy"]["clients"][str(c)].get("epsilon") is None]
        return False, (f"{found}; no sample-level ε to compare with: client(s) {nondp} "
                       f"trained without DP-SGD{suffix}")
    if report["user_level_epsilon"] is not None:
        return False, (f"{found}; the run has user-level DP only (ε = "
                       f"{report['user_level_epsilon']:.3f} per participant, not a per-row "
                       f"bound), so there is nothing to compare with{suffix}")
    return False, f"{found}; the run has no differential privacy to compare with{suffix}"
