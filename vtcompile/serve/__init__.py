"""`vtcompile serve`: an OpenAI-compatible HTTP endpoint over a continuous-batching engine.

engine.py (no web dependency: the scheduler, the slot cache, admission by KV bytes) is testable on its own;
protocol.py turns OpenAI chat requests into prompts and answers into OpenAI objects; images.py decodes image parts;
app.py is the thin FastAPI layer; metrics.py the Prometheus metrics; ray_app.py the Ray Serve deployment;
command.py the command line. The web packages (fastapi, uvicorn, prometheus-client; ray[serve]) are optional
extras, imported only by app.py, metrics.py and ray_app.py, so `import vtcompile` never needs them.
"""
