"""Zone geometry lives in :mod:`streamd.geometry`, shared with the daemon's object events
(which may not import ``streamd.alert``); this name stays so existing imports keep working."""

from ..geometry import (EDGE_EPS, Box, Point, bottom_center, crossing_edges,  # noqa: F401
                        intersection_area, overlap_fraction, point_in_polygon, polygon_area)
