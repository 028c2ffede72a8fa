# Registers the harness's pytest plugin (options, the matrix parametrisation, the
# lora_harness fixture, the results table). Nothing else belongs here.
pytest_plugins = ["harness.pytest_plugin"]
