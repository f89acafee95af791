"""Training scripts (accelerate-launchable) and their shared loop."""
