"""The command line: ``onnxquant preprocess|static|dynamic|weights|report``, one module per
subcommand, thin over the API."""

from onnxquant.cli.main import build_parser, main
from onnxquant.cli.static import static_config_from_args

__all__ = ["main", "build_parser", "static_config_from_args"]
