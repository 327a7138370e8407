"""Shadow mode: mirror live requests to a candidate and compare the predictions."""
