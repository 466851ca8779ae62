"""Built-in plugins. Each subpackage uses only the public core API, as a third party would."""
