"""Static quantization: its config, the op rules, node selection, the planner and
``quantize_static`` (calibrate → plan → emit QDQ or QOperator)."""
