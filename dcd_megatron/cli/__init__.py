"""Console scripts: dcd-train, dcd-eval, dcd-score, dcd-convert."""
