"""The Drift flag: how unlike the training images an image is, in numpy (torch only to fit on a run).

- :mod:`~defectscope.decision.drift.member`: what every member of a Drift score implements (:class:`DriftMember`);
- :mod:`~defectscope.decision.drift.scorer`: the pooled scores (msp, energy, mahalanobis, knn, vim) of the
  penultimate features and logits;
- :mod:`~defectscope.decision.drift.patch`: the ``patch`` score of the backbone's feature maps;
- :mod:`~defectscope.decision.drift.photometric`: the ``photometric`` score of the image's grey levels;
- :mod:`~defectscope.decision.drift.fusion`: standardising members, their max, choosing a score by its worst kind;
- :mod:`~defectscope.decision.drift.rule`: the policy's Drift score (one member or a max of several);
- :mod:`~defectscope.decision.drift.fit`: fitting the statistics on a run, and the Drift threshold;
- :mod:`~defectscope.decision.drift.support`: what a few normal calibration images can guarantee.
"""

from defectscope.decision.drift.member import DriftError, DriftMember

__all__ = ["DriftError", "DriftMember"]
