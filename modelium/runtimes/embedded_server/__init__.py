"""The process that serves one model for the embedded runtime, in three parts:

- `engine`: the model in memory and what it does with a request (generate, stream, classify,
  embed), parameters checked as OpenAI checks them;
- `http`: the routes (OpenAI's `/v1/*` for text generation, `/predict` for every task, `/health`);
- `serve`: the entry point, `python -m modelium.runtimes.embedded_server ...`.
"""
