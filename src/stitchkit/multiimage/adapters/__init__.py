"""Adapter sources copied verbatim into exports: `lmms_eval_utils.py` becomes the lmms-eval task folder's
`utils.py`, `vlmevalkit_mimic.py` becomes VLMEvalKit's `mimic.py` (with its MD5 table filled in). They import
lmms-eval / VLMEvalKit context, not stitchkit, so do not import them from here."""
