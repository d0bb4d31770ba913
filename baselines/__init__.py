"""Baseline defenses, one module each: `defend(model, data, *, seed, device, **hp) -> (model, diagnostics)`."""
