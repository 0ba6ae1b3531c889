"""Probes of the knowledge-recall process: PMET's component similarity, JEEP's contrast logit lens."""
