"""Serving: an OpenAI-compatible completions API on Ray Serve.

Pure logic lives here and imports without Ray: request validation and response shapes
(protocol.py), incremental text with stop strings (text.py), batched KV-cache generation and
sampling (generation.py), the load-adaptive batching policy and batch-loop health
(batching.py), checkpoint resolution and loading (loading.py), replica resources from the
cluster's accelerators (resources.py) and the app's settings (settings.py). app.py is the thin
Ray Serve layer: the FastAPI ingress and the model deployment.
"""
