"""What a run risks: personal data, memorization, canaries, bias, safety drift, fit and cost (the risk stage)."""
