"""`llm-scratch serve`: an OpenAI-compatible HTTP server over a trained model (engine: continuous
batching in a thread of its own; app: the FastAPI routes, the OpenAI wire format and its errors)."""
