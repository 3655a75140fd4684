"""Recovering accuracy after pruning: global AdaPrune (gAP), N:M post-training pruning, and
gradual pruning to a profile with distillation."""
