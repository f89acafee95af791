"""The toy world: a synthetic world of simple shapes that the embedded default models are trained on, and the
measurements that show each adapter family doing its job on them (docs/quality.md)."""
