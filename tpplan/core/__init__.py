"""The floor every layer stands on: errors, capped file reads and owned outputs, module-name patterns, layouts.

Imports nothing from tpplan."""
