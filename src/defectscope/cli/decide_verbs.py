"""Verbs that set how a run decides: ``calibrate`` (RUN/policy.json) and ``cascade`` (a screen + classifier
under one escape cap, optionally exported)."""

from __future__ import annotations

import argparse


def add_calibrate(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("calibrate", help="set the decision policy (PASS / REJECT / REVIEW under escape and overkill "
                                         "caps, costs, Drift) -> RUN/policy.json")
    c.add_argument("run", help="run directory")
    c.add_argument("--good-class", help="the class that means a part passes (default: a class named GOOD)")
    c.add_argument("--max-escape", type=float, help="cap on defective parts passed as good, e.g. 0.01")
    c.add_argument("--max-overkill", type=float,
                   help="with --max-escape: cap on good parts rejected automatically, e.g. 0.05; images between the "
                        "PASS and REJECT thresholds go to REVIEW (a person)")
    c.add_argument("--critical", type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
                   help="comma-separated defect classes the escape cap covers (default: all); the others are "
                        "nuisance classes whose escapes are reported, not capped")
    c.add_argument("--reject-purity", metavar="TARGETS",
                   help="with the two caps: REJECT as a defect class only where the calibration images certify "
                        "that such REJECTs are right at least this often, e.g. 0.9 (every defect class) or "
                        "scratch=0.95,particle=0.8; the others go to REVIEW")
    c.add_argument("--purity-score", default="probability", choices=["probability", "margin"],
                   help="what the purity threshold compares: calibrated P(class) or its margin over the next class")
    c.add_argument("--escape-share", type=float, default=0.5,
                   help="with two caps: the share of 1 - confidence spent on the escape cap (0.5)")
    c.add_argument("--confidence", type=float, default=0.95,
                   help="confidence of the guarantee; with two caps, both hold together at it (0.95)")
    c.add_argument("--escape-score", default="auto", choices=["auto", "p_good", "severity"],
                   help="what the escape cap thresholds: P(good), 1 - expected severity along data.class_order, "
                        "or auto (the better by binary AUROC on the validation split)")
    c.add_argument("--cost-matrix", help="valeo_pwa or a YAML file {classes: [...], costs: [[...]]}")
    c.add_argument("--review-rate", type=float, help="send this share of least-confident images to REVIEW")
    c.add_argument("--target-purity", type=float, help="or: review until auto-decided accuracy reaches this")
    c.add_argument("--review-score", default="top", choices=["top", "margin"],
                   help="confidence measure for the review band")
    c.add_argument("--drift-rate", type=float, default=0.01,
                   help="share of normal images the Drift flag may catch (default 0.01)")
    c.add_argument("--drift-score",
                   help="Drift score: msp, energy, mahalanobis, knn, vim (linear heads only), patch (feature-map "
                        "Gaussians), photometric (grey-level statistics), or a max of standardised scores such as "
                        "'max(knn,patch,photometric)' (default: the score RUN/drift_eval.json chose, else "
                        "mahalanobis)")
    c.add_argument("--drift-examples", help="folder of real Drift images (with a cost matrix that has Drift)")
    c.add_argument("--no-drift", action="store_true", help="no Drift flag in the policy")
    c.set_defaults(handler=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from defectscope.cli.options import per_class_numbers
    from defectscope.decision.calibrate import calibrate

    calibrate(args.run, good_class=args.good_class, max_escape=args.max_escape, confidence=args.confidence,
              cost_matrix=args.cost_matrix, review_rate=args.review_rate, target_purity=args.target_purity,
              review_score=args.review_score, drift_rate=None if args.no_drift else args.drift_rate,
              drift_score=args.drift_score, drift_examples=args.drift_examples, escape_score=args.escape_score,
              max_overkill=args.max_overkill, critical_classes=args.critical, escape_share=args.escape_share,
              reject_purity=None if args.reject_purity is None else per_class_numbers("--reject-purity",
                                                                                       args.reject_purity),
              purity_score=args.purity_score)
    return 0


def add_cascade(sub: argparse._SubParsersAction) -> None:
    ca = sub.add_parser("cascade", help="calibrate a two-stage cascade (small screen + classifier) under one "
                                        "escape cap, and export it")
    ca.add_argument("screen_run", help="run of the small screen model (good vs defective, or any run with GOOD)")
    ca.add_argument("classifier_run", help="run of the full classifier (its calibration images are used)")
    ca.add_argument("--max-escape", type=float, required=True, help="end-to-end cap on defective parts passed")
    ca.add_argument("--confidence", type=float, default=0.95, help="confidence of the escape guarantee (0.95)")
    ca.add_argument("--method", default="split", choices=["split", "fixed"],
                    help="split: cap and risk split between the stages (strict); fixed: keep the classifier's "
                         "threshold and scan the screen's (valid if that threshold was set on other images)")
    ca.add_argument("--screen-share", type=float, default=0.5, help="share of the cap the screen may use (split)")
    ca.add_argument("--classifier-threshold", type=float, help="fixed classifier P(good) threshold (method fixed)")
    ca.add_argument("--good-class", help="the classifier's good class (default: its policy's, or GOOD)")
    ca.add_argument("--screen-good-class", help="the screen's good class (default: the same name, or GOOD)")
    ca.add_argument("--out", help="cascade policy JSON (default CLASSIFIER_RUN/cascade_policy.json)")
    ca.add_argument("--export", metavar="DIR", help="also export: DIR/cascade.json + screen.onnx + classifier.onnx "
                                                    "(two files, compute saved) and DIR/cascade_graph.onnx (one graph)")
    ca.add_argument("--form", default="both", choices=["both", "files", "graph"], help="which export form(s)")
    ca.set_defaults(handler=run_cascade)


def run_cascade(args: argparse.Namespace) -> int:
    from defectscope.decision.cascade import cascade

    written = cascade(args.screen_run, args.classifier_run, out=args.out, max_escape=args.max_escape,
                      confidence=args.confidence, method=args.method, screen_share=args.screen_share,
                      classifier_threshold=args.classifier_threshold, good_class=args.good_class,
                      screen_good_class=args.screen_good_class)
    if args.export:
        from pathlib import Path

        from defectscope.onnx_export.cascade_graph import GRAPH, export_cascade

        if args.form in ("both", "files"):
            export_cascade(written["path"], args.export, form="files")
        if args.form in ("both", "graph"):
            export_cascade(written["path"], Path(args.export) / GRAPH, form="graph")
    return 0
