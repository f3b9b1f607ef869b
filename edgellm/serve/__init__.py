"""`edgellm serve`: an OpenAI-compatible HTTP server around one loaded model (needs the [serve] extra).

app.py (routes) → schema.py (request parsing) → engine.py (queue, worker, deadline) → runtime LLM;
pool.py (--sessions), cache.py (response cache), metrics.py (Prometheus), server.py (uvicorn, Ctrl-C).
Not imported by `import edgellm`: starlette and uvicorn load only when a server is started.
"""
