"""Record and replay: capture sampled live exchanges of a route, replay them elsewhere."""
