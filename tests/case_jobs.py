"""A small scoring job (three regions, several predictions) shared by the evaluation tests."""

import numpy as np

from dgseg.evaluation.scoring import CaseJob


def case_job(case_id, seed, n_preds=3, shape=(3, 13, 11, 9)):
    """(job, truth, preds): an anisotropic 13×11×9 case whose three region masks differ, and
    ``n_preds`` seeded random predictions of increasing density."""
    rng = np.random.default_rng(seed)
    truth = np.zeros(shape, bool)
    truth[:, 3:9, 2:8, 2:7] = True
    truth[1, 3:5] = False
    truth[2, :, :, :4] = False
    preds = [
        ({"model": "m", "case_id": case_id, "k": k}, rng.random(shape) < 0.2 * (k + 1))
        for k in range(n_preds)
    ]
    return CaseJob.build(case_id, truth, (1.0, 1.5, 0.8), preds), truth, preds
