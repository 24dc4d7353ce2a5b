"""The evaluation gate (`nemo-rlhf eval`): is a checkpoint fit to promote?

- `responses`: the responses files the gate reads (file:line errors);
- `findings`: `Finding` (one check: value, threshold, message) and `GateResult` (the verdict);
- `detectors/`: reward hacking, length inflation, template collapse, degenerate responses,
  KL budget, safety regression;
- layer 1: `capability` (GSM8K), `format_checks`, `instructions`; layer 2: `battles` with
  `judges`;
- `run`: runs them all, scores missing rewards with HF reward models, writes the report
  (findings.json, badcases.jsonl, manifest.json);
- `report_html`: report.html, one self-contained page (verdict, numbers, plots, samples);
- `badcases`: the loop back into data: reviewed bad cases -> SFT / preference files with
  lineage (`nemo-rlhf data add-badcases`).
"""
