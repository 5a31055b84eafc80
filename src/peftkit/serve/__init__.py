"""`peftkit serve`: one base model behind an OpenAI-compatible HTTP API, many adapters on it, and
requests for different adapters decoded together in one continuous batch (docs/serve.md).

engine.py schedules and decodes; kv.py keeps the batch's cache as rows join and leave;
sampling.py and rows.py turn logits into each request's text; proxy_rows.py adds Proxy-Tuning per
row; adapters.py names, confines, loads and unloads adapters; protocol.py, handling.py and app.py
speak HTTP; server.py starts it all. Heavy imports happen in those modules, not here."""
