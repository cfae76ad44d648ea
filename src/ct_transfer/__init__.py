"""ct-transfer."""
