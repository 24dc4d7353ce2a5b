"""HF <-> NeMo (.nemo) checkpoint conversion, table-driven per architecture family.

`convert.hf_to_nemo` / `convert.nemo_to_hf` are the entry points; `families/` holds one
mapping table per architecture, `param_mapping` the split/merge math, `nemo_archive` and
`dist_ckpt` the on-disk formats NeMo 2.1 reads.
"""
