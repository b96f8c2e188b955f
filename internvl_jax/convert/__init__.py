"""The checkpoint bridge: HF InternVL checkpoints (official and transformers layouts) <-> our models.

`load.load_state` / `internvl_jax.load_pretrained` import, `export.export_model` exports,
`python -m internvl_jax.convert` does both from the command line.
"""
