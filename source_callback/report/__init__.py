"""An HTML report of a recorded run and its analyses (``source-callback report``)."""

from source_callback.report.api import write_report
from source_callback.report.render import Renderer, default_renderer

__all__ = ["Renderer", "default_renderer", "write_report"]
