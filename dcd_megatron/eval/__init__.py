"""Math evaluation: answer extraction and grading, benchmark loaders, generation, scoring, ExAccErr.

Modules (imports point down): ``cli`` -> ``scoring`` / ``generation`` / ``exposure_bias`` ->
``benchmarks`` -> ``answers``. Nothing here imports megatron-core; the model comes in as a
callable (see ``generation``).
"""
