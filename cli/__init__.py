"""The `modelium` command: parses arguments and starts the composition roots (`workers/`).

It sits above every other package; nothing imports it but its entry point and the tests.
"""
