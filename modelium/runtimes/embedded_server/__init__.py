"""The process that serves one model for the embedded runtime, in four parts:

- `engine`: the model in memory and what it does with a request (generate, stream, classify,
  embed), parameters checked as OpenAI checks them;
- `http`: the routes (OpenAI's `/v1/*` for text generation, `/predict` for every task, `/health`);
- `serve`: the entry point, `python -m modelium.runtimes.embedded_server ...`;
- `spare`: a warm spare, imports done, that is handed its model later (the warm pool).
"""

import time

# When this process began importing (the package is imported first): a spare's "ready in" line
# counts its imports from here.
STARTED = time.monotonic()
