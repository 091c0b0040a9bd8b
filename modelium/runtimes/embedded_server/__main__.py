import sys

# The first line of the runtime's log, before the seconds of importing torch and transformers:
# a load's progress (GET /events, the dashboard) shows what the runtime is doing from the start.
print("embedded runtime: importing torch and transformers", file=sys.stderr, flush=True)

from modelium.runtimes.embedded_server.serve import main  # noqa: E402

main()
