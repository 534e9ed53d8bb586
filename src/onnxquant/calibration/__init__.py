"""Calibration: where feeds come from (:mod:`.readers`) and how activation ranges are collected."""
